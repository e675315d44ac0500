"""Train a byte-level BPE tokenizer or load one from disk, always as a Hugging Face tokenizer dir.

Byte-level BPE encodes any text without an unknown token, and saving with ``save_pretrained`` lets
the exported model be loaded by ``transformers.AutoTokenizer`` offline. One special token,
``<|endoftext|>``, is both BOS and EOS: packing puts it after every document, so it is the document
separator the model learns.

The non-causal objectives need more special tokens (``corruption.required_tokens``: mask, cls, sep,
pad; sentinels and mode tokens). They are added after the byte-level BPE model, with the ids that
follow it, so the tokenizer of an mlm run encodes text to exactly the ids of the clm run's and a clm
tokenizer is what it always was. They never take the place of merges: a trained tokenizer has
``vocab_size`` tokens plus these.
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.tokens.corruption import SPECIAL

EOS_TOKEN = "<|endoftext|>"


class TokenizerConfig(BaseModel):
    """Which tokenizer a run uses: a local one, or one trained on (a capped sample of) the corpus."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        description="Local Hugging Face tokenizer directory to load; leave empty to train one on the corpus.",
    )
    vocab_size: int = Field(
        8192, ge=260, description="Vocabulary size of a trained tokenizer (256 bytes + merges + EOS)."
    )
    max_train_docs: int | None = Field(
        20_000, ge=1, description="Train on at most this many documents (the first ones read); null for all."
    )
    max_train_bytes: int | None = Field(
        100_000_000, ge=1, description="Stop reading training text after this many UTF-8 bytes; null for all."
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair must occur at least this often in the sample to become a merge."
    )


def prepare_tokenizer(
    config: TokenizerConfig, texts: Iterable[str], out_dir: Path, *, progress: bool | None = None,
    extra_special: Sequence[str] = (), frozen_by: str | None = None,
) -> PreTrainedTokenizerFast:
    """Load ``config.path`` or train on ``texts`` within the caps; either way save it to ``out_dir``.

    Saving a loaded tokenizer too keeps the run folder self-contained for export and evaluation.
    ``progress`` is training's (see ``train_tokenizer``); loading is quick and says nothing.
    ``extra_special``: special tokens the objective needs (``corruption.required_tokens``), added
    where missing (see ``add_special``); ``frozen_by`` names what fixes a loaded tokenizer's ids
    (e.g. ``model.init_from=PATH``), so that adding any is refused.
    """
    if config.path is not None:
        tokenizer = load_tokenizer(config.path)
        add_special(tokenizer, extra_special, origin=f"tokenizer.path={config.path}", frozen_by=frozen_by)
        tokenizer.save_pretrained(out_dir)
        return tokenizer
    sample = _capped(texts, config.max_train_docs, config.max_train_bytes)
    return train_tokenizer(sample, config.vocab_size, out_dir, min_frequency=config.min_frequency,
                           progress=progress, extra_special=extra_special)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path, *, min_frequency: int = 2,
    progress: bool | None = None, extra_special: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and save it to ``out_dir`` as a Hugging Face tokenizer.

    ``progress``: True shows the trainer's own bars; False prints a start and a finish line (logs
    without a terminal); None, for library calls, says nothing. ``extra_special`` tokens are added
    after training (ids from ``vocab_size`` on; EOS stays 0); none leaves the tokenizer as it was.
    """
    t0 = time.perf_counter()
    if progress is False:
        print(f"tokenizer: training byte-level BPE, vocab_size {vocab_size:,}", flush=True)
    read = {"docs": 0, "bytes": 0}

    def counted() -> Iterator[str]:
        for text in texts:
            read["docs"] += 1
            read["bytes"] += len(text.encode())
            yield text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress is True,
    )
    backend.train_from_iterator(counted(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    add_special(tokenizer, extra_special, origin=f"tokenizer.vocab_size={vocab_size}")
    tokenizer.save_pretrained(out_dir)
    # transformers 5 records its internal class name; the public alias also loads with transformers 4.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    if progress is False:
        print(f"tokenizer: {len(tokenizer):,} tokens from {read['docs']:,} documents ({read['bytes']:,} bytes) "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a local Hugging Face tokenizer directory (never the Hub); it must be fast and have an EOS."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise TokenmillError(
            f"tokenizer: {path} has no tokenizer.json; point tokenizer.path at a directory written by "
            "save_pretrained (a fast tokenizer), or leave it empty to train one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # the Rust parser raises plain Exception on a malformed tokenizer.json
        raise TokenmillError(f"tokenizer: cannot load {path}: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise TokenmillError(f"tokenizer: {path} loads as a slow tokenizer; packing needs a fast (Rust) one")
    if tokenizer.eos_token_id is None:
        raise TokenmillError(
            f"tokenizer: {path} has no eos_token; set one in its tokenizer_config.json "
            "(documents are separated by it)"
        )
    return tokenizer


_ROLES = {token: f"{role}_token" for role, token in SPECIAL.items()}  # <mask> -> mask_token, ...
UINT16_IDS = 1 << 16  # ids a uint16 token shard holds (tokens.pack.token_dtype)


def add_special(
    tokenizer: PreTrainedTokenizerFast, tokens: Sequence[str], *, origin: str, frozen_by: str | None = None
) -> list[str]:
    """Add the ``tokens`` the tokenizer lacks as special tokens, in order, with the next free ids; return
    those added. The mask, cls, sep and pad tokens also take their roles (``tokenizer.mask_token`` ...), so
    an exported model's tokenizer knows them.

    Refused, naming ``origin`` (the recipe field the tokenizer comes from): any addition when
    ``frozen_by`` is set (a checkpoint's embedding has a row per existing id and none for new ones), and
    an addition that takes a vocabulary which fits uint16 token shards past 65,536 ids: the shards
    would silently become uint32, twice the disk and page cache, for a handful of tokens.
    """
    have = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in have]
    if missing and frozen_by is not None:
        raise TokenmillError(
            f"tokenizer: the objective needs the special token(s) {_listed(missing)}, which {origin} lacks, and "
            f"{frozen_by} fixes its ids (its embedding has no row for a new token); train from scratch or use "
            "a checkpoint whose tokenizer has them")
    size = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    if size <= UINT16_IDS < size + len(missing):
        hint = (f"lower tokenizer.vocab_size to {UINT16_IDS - len(missing):,} or less" if "vocab_size" in origin
                else "use a tokenizer that has them or one with fewer tokens")
        raise TokenmillError(
            f"tokenizer: adding the objective's {len(missing)} special token(s) to {origin} ({size:,} tokens) "
            f"would need {size + len(missing):,} ids, past the {UINT16_IDS:,} of uint16 token shards; {hint}")
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    for token in tokens:
        if token in _ROLES:
            setattr(tokenizer, _ROLES[token], token)
    return missing


def _listed(tokens: list[str]) -> str:
    return ", ".join(tokens) if len(tokens) <= 6 else f"{', '.join(tokens[:5])} ... ({len(tokens)} in all)"


def _capped(texts: Iterable[str], max_docs: int | None, max_bytes: int | None) -> Iterator[str]:
    budget = max_bytes
    for text in islice(texts, max_docs):
        yield text
        if budget is not None:
            budget -= len(text.encode())
            if budget <= 0:
                return
