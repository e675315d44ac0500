"""PII masking: replace e-mail addresses, IP addresses and phone numbers with placeholder tokens, so a
model cannot memorise and regurgitate them. Documents are never removed.

Each kind has a cheap RE2 prefilter run over the whole batch by Arrow; only the few documents it flags
go through the precise Python pattern, whose look-arounds RE2 lacks and whose matches can be validated
(a real IP address, a public one, enough digits for a phone number). Dotted version numbers such as
``3.11.7`` or ``1.2.3.4.5`` are not addresses: an IPv4 address is exactly four octets of 0..255 not
glued to other digits, dots or letters.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.schema import put_column, with_reason

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

Kind = Literal["email", "ip", "phone"]


@dataclass(frozen=True)
class _Detector:
    prefilter: str  # RE2, matches every document ``pattern`` can match in (and a few more)
    pattern: re.Pattern
    is_valid: Callable[[str, bool], bool]  # (match, public_ips_only) -> mask it?


def _is_ip(candidate: str, public_only: bool) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:  # hex groups and colons that are no address: a time, a MAC address
        return False
    return address.is_global or not public_only


def _is_ipv6(candidate: str, public_only: bool) -> bool:
    """Two hex groups at least, so that '::' (a Haskell type, a C++ scope) and '::1' stay text."""
    return sum(bool(group) for group in candidate.split(":")) >= 2 and _is_ip(candidate, public_only)


def _is_phone(candidate: str, public_only: bool) -> bool:
    return 7 <= sum(c.isdigit() for c in candidate) <= 15  # E.164 allows at most 15 digits


DETECTORS: dict[str, tuple[_Detector, ...]] = {
    "email": (
        _Detector(
            "@",
            re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"),
            lambda candidate, public_only: True,
        ),
    ),
    "ip": (
        _Detector(
            r"[0-9A-Fa-f]?:[0-9A-Fa-f]{0,4}:",
            re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.\w)"),
            _is_ipv6,
        ),
        _Detector(
            r"\d\.\d{1,3}\.\d{1,3}\.\d",
            re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)"),
            _is_ip,
        ),
    ),
    "phone": (
        _Detector(
            r"\d{3}[.-]\d{4}|\+\d{1,3}[ .-]?\(?\d",
            re.compile(
                r"(?<![\w+])(?:"
                r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958
                r"|(?:\(\d{3}\) ?|\d{3}[.-])\d{3}[.-]\d{4}"  # (555) 123-4567, 555-123-4567
                r")(?!\w|[.-]\d)"
            ),
            _is_phone,
        ),
    ),
}


class PIIParams(StepParams):
    step: Literal["pii"] = "pii"
    mask: list[Kind] = Field(["email", "ip", "phone"], description="Which kinds of PII to replace.")
    email_replacement: str = Field("<EMAIL>", description="Text put in place of each e-mail address.")
    ip_replacement: str = Field("<IP>", description="Text put in place of each IPv4 or IPv6 address.")
    phone_replacement: str = Field("<PHONE>", description="Text put in place of each phone number.")
    public_ips_only: bool = Field(
        True,
        description="Mask only globally routable IP addresses; private, loopback, link-local and reserved "
        "ones (192.168.0.1, 127.0.0.1, 10.0.0.0) identify no one and are common in technical text.",
    )


class PII(Step):
    """Mask PII in place; counters ``email``, ``ip``, ``phone`` count the replacements."""

    Params = PIIParams

    def process(self, table: pa.Table) -> StepResult:
        p = self.params
        text = table.column("text").combine_chunks()
        counters = {}
        for kind in p.mask:
            counters[kind] = 0
            for detector in DETECTORS[kind]:
                text, replaced = _mask(text, detector, getattr(p, f"{kind}_replacement"), p.public_ips_only)
                counters[kind] += replaced
        masked = put_column(table, "text", text)
        return StepResult(masked, with_reason(table.slice(0, 0), [], self.name), counters)


def _mask(
    text: pa.Array, detector: _Detector, replacement: str, public_ips_only: bool
) -> tuple[pa.Array, int]:
    """Replace the detector's valid matches in the rows its prefilter flags; return the new text and
    the number of replacements."""
    flagged = pc.match_substring_regex(text, detector.prefilter).to_numpy(zero_copy_only=False)
    if not flagged.any():
        return text, 0
    replaced = 0

    def substitute(match: re.Match) -> str:
        nonlocal replaced
        if not detector.is_valid(match.group(0), public_ips_only):
            return match.group(0)
        replaced += 1
        return replacement

    new = [detector.pattern.sub(substitute, doc) for doc in text.filter(pa.array(flagged)).to_pylist()]
    return pc.replace_with_mask(text, pa.array(flagged), pa.array(new, text.type)), replaced
