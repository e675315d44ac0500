"""Tokens: train or load a tokenizer, pack documents into token shards, and load training batches.

``tokenizer`` makes the byte-level BPE every later stage shares; ``pack`` turns curated Parquet
shards into flat token files with a per-document index; ``loader`` cuts deterministic, resumable,
domain-mixed training batches from those files without re-tokenising when the mixture changes.
"""
