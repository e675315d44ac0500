"""Vectorised 64-bit text hashing shared by the curation (dedup, decontamination) and selection steps.

Hashes are 64-bit, so two different texts collide with probability about n²/2⁶⁵ over n texts
(3·10⁻⁶ at ten million documents). Long strings (documents, vocabulary words) go through
``hashlib.blake2b`` one call each, which is faster than any numpy byte loop for them; many short
sequences (lines, n-grams) are hashed in numpy from their words' hashes, never one Python call each.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SPACE_BYTE = np.zeros(256, bool)
_SPACE_BYTE[[9, 10, 11, 12, 13, 32]] = True
# A word is a maximal run of ASCII letters, digits, "_" or non-ASCII bytes (so a multi-byte UTF-8
# character is never split); everything else (spaces, ASCII punctuation) separates words.
_WORD_BYTE = np.zeros(256, bool)
_WORD_BYTE[[*b"0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", *range(128, 256)]] = True


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_buffers(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes (uint8) and ``len + 1`` int64 offsets (from 0) of an Arrow string column, without copying bytes."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = strings.cast(pa.large_binary())
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.empty(0, np.uint8) if data_buffer is None else np.frombuffer(data_buffer, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def blake64(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit BLAKE2b of each segment ``data[offsets[i]:offsets[i+1]]``."""
    view = memoryview(data)
    digests = b"".join(
        hashlib.blake2b(view[start:end], digest_size=8).digest()
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    )
    return np.frombuffer(digests, np.uint64).copy()


def hash_strings(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of each string, stable across processes and runs (unlike Python's ``hash``)."""
    return blake64(*string_buffers(strings))


def normalized_text_hashes(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hash of each text lowercased, trimmed, with every run of ASCII whitespace made one space."""
    data, offsets = string_buffers(pc.utf8_trim_whitespace(pc.utf8_lower(texts)))
    space = _SPACE_BYTE[data]
    repeated = np.zeros_like(space)
    repeated[1:] = space[1:] & space[:-1]  # trimmed texts never start with a space
    keep = ~repeated
    kept_before = np.r_[0, np.cumsum(keep)]
    return blake64(np.where(space, np.uint8(32), data)[keep], kept_before[offsets])


def word_hashes(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Hash every lowercased word of every text: ``(hashes, offsets)``, text i's words at offsets[i]:offsets[i+1].

    Runs on the batch's bytes in numpy; only the batch's distinct words are hashed one by one.
    """
    data, offsets = string_buffers(pc.utf8_lower(texts))
    is_word = _WORD_BYTE[data]
    text_starts = offsets[:-1][offsets[:-1] < len(data)]
    text_ends = offsets[1:][offsets[1:] > 0] - 1
    first = is_word.copy()
    first[1:] &= ~is_word[:-1]
    first[text_starts] = is_word[text_starts]
    last = is_word.copy()
    last[:-1] &= ~is_word[1:]
    last[text_ends] = is_word[text_ends]
    starts, ends = np.flatnonzero(first), np.flatnonzero(last) + 1
    word_offsets = np.r_[0, np.cumsum(ends - starts)]
    words = pa.Array.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(word_offsets), pa.py_buffer(data[is_word])]
    ).dictionary_encode()
    hashes = hash_strings(words.dictionary)[words.indices.to_numpy()]
    return hashes, np.searchsorted(starts, offsets)


def sequence_hashes(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One order-sensitive 64-bit hash per segment ``values[offsets[i]:offsets[i+1]]`` of uint64 hashes."""
    counts = np.diff(offsets)
    position = np.arange(len(values)) - np.repeat(offsets[:-1], counts)
    terms = mix64(values + position.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    sums = np.zeros(len(counts), np.uint64)
    nonempty = counts > 0
    sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    return mix64(sums ^ counts.astype(np.uint64))


def odd_constants(count: int, salt: int) -> np.ndarray:
    """``count`` odd uint64 multipliers, distinct per ``salt``: odd, so multiplying by one is a bijection."""
    return mix64(np.arange(count, dtype=np.uint64) + np.uint64(salt << 32)) | np.uint64(1)


def ngram_hashes(word_hash: np.ndarray, word_offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every word n-gram of every text: ``(hashes, offsets)`` laid out like ``word_hashes``.

    A text of 1 to n-1 words is one n-gram of all its words; a text without words has none.
    """
    counts = np.diff(word_offsets)
    per_text = np.maximum(counts - n + 1, np.minimum(counts, 1))
    offsets = np.r_[0, np.cumsum(per_text)]
    # Lay the texts out with n-1 zero hashes after each, so that an n-gram is a plain sliding window:
    # it never reaches into the next text, and a short text's one n-gram holds only its own words.
    shift = np.arange(len(counts)) * (n - 1)
    spaced = np.zeros(len(word_hash) + len(counts) * (n - 1), np.uint64)
    spaced[np.arange(len(word_hash)) + np.repeat(shift, counts)] = word_hash
    windows = np.zeros(max(0, len(spaced) - n + 1), np.uint64)
    for k, multiplier in enumerate(odd_constants(n, salt=1)):
        windows += spaced[k : k + len(windows)] * multiplier
    starts = np.arange(offsets[-1]) + np.repeat(word_offsets[:-1] + shift - offsets[:-1], per_text)
    return mix64(windows[starts]), offsets
