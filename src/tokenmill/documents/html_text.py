"""HTML pages: bytes in any charset to Unicode, a cheap batch sniff, and main-text extraction.

Readers decode pages here (one policy for .html files and WARC records) and keep the raw HTML; the
``extract`` step later turns it into the page's main text, so the choice of extractor stays a recipe
parameter and a page is parsed only once per run.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding

from tokenmill import TokenmillError

Extractor = Literal["resiliparse", "trafilatura"]

# A page starts (after blanks, an XML prolog or comments) with a doctype or one of the outer elements.
_HTML_START = r"(?is)^\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)[\s>]"
_SNIFF_CHARS = 1024


def decode_html(data: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """``(text, encoding)`` of a page, or None when no candidate charset decodes every byte.

    Candidates in order: UTF-8 (bytes that are valid UTF-8 and not ASCII are UTF-8 with near
    certainty, whatever the page claims: mislabelled pages are common), then the charset the transport
    declared (HTTP header), the page's ``<meta charset>``, and uchardet's guess from the bytes.
    """
    candidates = ["utf-8", declared, detect_encoding(data, from_html_meta=True), detect_encoding(data)]
    for encoding in dict.fromkeys(c.lower() for c in candidates if c):
        try:
            return data.decode(encoding).lstrip("\ufeff"), encoding
        except (UnicodeDecodeError, LookupError):
            continue
    return None


def looks_like_html(text: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean mask over a batch: does each text begin like an HTML page? (one regex kernel, first KB)"""
    head = pc.utf8_slice_codeunits(text, 0, _SNIFF_CHARS)
    return pc.match_substring_regex(head, _HTML_START).to_numpy(zero_copy_only=False)


def extract_main_text(html: str, extractor: Extractor = "resiliparse") -> str:
    """The main text of a page without navigation, headers and footers ("" when nothing is left)."""
    if extractor == "resiliparse":
        return extract_plain_text(html, main_content=True, preserve_formatting=True).strip()
    return (_trafilatura().extract(html, include_comments=False, include_tables=True,
                                   deduplicate=False) or "").strip()


def _trafilatura():
    """trafilatura is optional (it pulls in lxml and date parsers); import it only when chosen."""
    try:
        import trafilatura
    except ImportError as err:
        raise TokenmillError(f"extractor 'trafilatura' needs the trafilatura package ({err}); install it "
                             f"with `pip install 'tokenmill[trafilatura]'` or use extractor: resiliparse")
    return trafilatura
