"""Tokenizer, packing and loader: round trips, on-disk layout, resume, determinism and mixing."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.documents.schema import make_table
from tokenmill.tokens.loader import TokenDataset, TokenLoader, eval_windows
from tokenmill.tokens.pack import pack_documents, token_dtype
from tokenmill.tokens.tokenizer import (
    EOS_TOKEN,
    TokenizerConfig,
    load_tokenizer,
    prepare_tokenizer,
    train_tokenizer,
)

SYLLABLES = "ka lo mi ne su ta ri po de fa gu xi zo be wa".split()
SEQ_LEN = 15


def make_docs(domain: str, n: int, seed: int) -> list[dict]:
    """Documents of pseudo-words (one to three syllables), varied enough to need a few hundred merges."""
    rng = random.Random(seed)

    def text() -> str:
        words = ("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(5, 80)))
        return " ".join(words)

    return [{"id": f"{domain}/{i}", "domain": domain, "text": text()} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [doc["text"] for doc in make_docs("train", 300, seed=0)] + ["héllo wörld 日本語 ✓"]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards with domains interleaved across them; 'tiny' has less than one window."""
    root = tmp_path_factory.mktemp("docs")
    a, b = make_docs("a", 120, seed=1), make_docs("b", 90, seed=2)
    tiny = [{"id": "tiny/0", "domain": "tiny", "text": "dog"}]
    contents = [a[:40] + b[:30] + a[40:60], b[30:90] + tiny, a[60:] + [{**a[0], "id": "a/dup", "text": ""}]]
    paths = []
    for i, rows in enumerate(contents):
        paths.append(root / f"part-{i}.parquet")
        pq.write_table(make_table(rows), paths[-1])
    return paths


@pytest.fixture(scope="module")
def packed(shards, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    pack_documents(shards, tokenizer, out, batch_docs=16)
    return out


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def domain_stream(shards, tokenizer, domain: str) -> np.ndarray:
    """A domain's documents in input order, each followed by EOS: what the loader must cut windows from."""
    rows = [row for path in shards for row in pq.read_table(path).to_pylist() if row["domain"] == domain]
    return np.array([t for row in rows for t in encode(tokenizer, row["text"]) + [tokenizer.eos_token_id]])


# ---- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_reloads_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in ["kalo mine suta", "  spaces\n\ttabs ", "héllo wörld 日本語 ✓", "unseen: zebra 42!"]:
        ids = encode(tokenizer, text)
        assert tokenizer.decode(ids) == text
        assert encode(reloaded, text) == ids
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == reloaded.eos_token_id == eos
    assert tokenizer.unk_token is None
    assert len(tokenizer) == 400


def test_prepare_tokenizer_respects_sample_caps(tmp_path):
    pulled = []

    def texts():
        for doc in make_docs("t", 50, seed=3):
            pulled.append(doc)
            yield doc["text"]

    config = TokenizerConfig(vocab_size=300, max_train_docs=7, max_train_bytes=None)
    prepare_tokenizer(config, texts(), tmp_path)
    assert len(pulled) == 7
    pulled.clear()
    first_two = sum(len(doc["text"].encode()) for doc in make_docs("t", 2, seed=3))
    prepare_tokenizer(TokenizerConfig(vocab_size=300, max_train_bytes=first_two), texts(), tmp_path / "b")
    assert len(pulled) == 2
    assert load_tokenizer(tmp_path / "b").eos_token == EOS_TOKEN


def test_prepare_tokenizer_loads_and_copies_a_given_path(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "mine")
    copy = prepare_tokenizer(TokenizerConfig(path=str(tmp_path / "mine")), iter(()), tmp_path / "run")
    assert encode(copy, "kalo mine") == encode(tokenizer, "kalo mine")
    assert encode(load_tokenizer(tmp_path / "run"), "kalo mine") == encode(tokenizer, "kalo mine")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenmillError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenmillError, match="cannot load"):
        load_tokenizer(tmp_path / "broken")
    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "no_eos")
    with pytest.raises(TokenmillError, match="no eos_token"):
        load_tokenizer(tmp_path / "no_eos")


# ---- packing ---------------------------------------------------------------------------------------


def test_pack_writes_each_document_then_eos(shards, tokenizer, packed):
    meta = json.loads((packed / "meta.json").read_text())
    index = pq.read_table(packed / "index.parquet").to_pylist()
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    assert [entry["doc_id"] for entry in index] == [row["id"] for row in rows]
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tokenizer.eos_token_id
    bins = [np.fromfile(packed / f"shard-{i:05d}.bin", np.uint16) for i in range(len(shards))]
    for entry, row in zip(index, rows):
        tokens = bins[entry["shard"]][entry["offset"] : entry["offset"] + entry["length"]]
        assert tokens.tolist() == encode(tokenizer, row["text"]) + [tokenizer.eos_token_id]
        assert entry["bytes"] == len(row["text"].encode()) and entry["domain"] == row["domain"]
    for shard, tokens in enumerate(bins):
        entries = [entry for entry in index if entry["shard"] == shard]
        assert entries[0]["offset"] == 0
        assert all(e["offset"] + e["length"] == f["offset"] for e, f in zip(entries, entries[1:]))
        assert entries[-1]["offset"] + entries[-1]["length"] == len(tokens)
    assert meta["n_tokens"] == sum(len(tokens) for tokens in bins)
    for domain in ("a", "b", "tiny"):
        assert meta["domains"][domain]["tokens"] == len(domain_stream(shards, tokenizer, domain))


def test_pack_keeps_special_token_text_literal(tokenizer, tmp_path):
    document = {"id": "x", "domain": "d", "text": f"fox {EOS_TOKEN} dog"}
    pq.write_table(make_table([document]), tmp_path / "s.parquet")
    pack_documents([tmp_path / "s.parquet"], tokenizer, tmp_path / "out")
    tokens = np.fromfile(tmp_path / "out" / "shard-00000.bin", np.uint16)
    assert (tokens == tokenizer.eos_token_id).sum() == 1 and tokens[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokens[:-1]) == f"fox {EOS_TOKEN} dog"


def test_large_vocab_packs_as_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    vocab = {f"w{i}": i for i in range(70_000)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w69999")
    document = {"id": "x", "domain": "d", "text": "w65536 w3 w69998"}
    pq.write_table(make_table([document]), tmp_path / "s.parquet")
    meta = pack_documents([tmp_path / "s.parquet"], tokenizer, tmp_path / "out")
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "out" / "shard-00000.bin", np.uint32).tolist() == [65536, 3, 69998, 69999]


def test_pack_resume_skips_complete_shards(shards, tokenizer, packed, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(packed, out)
    for name in ("shard-00001.bin", "index.parquet", "meta.json"):
        (out / name).unlink()
    kept = (out / "shard-00000.bin").stat().st_mtime_ns
    summary = pack_documents(shards, tokenizer, out, batch_docs=16)
    assert (summary["shards_packed"], summary["shards_skipped"]) == (1, 2)
    assert (out / "shard-00000.bin").stat().st_mtime_ns == kept
    for name in ("shard-00001.bin", "index.parquet", "meta.json"):
        assert (out / name).read_bytes() == (packed / name).read_bytes()
    other = train_tokenizer(["completely different words"] * 20, 300, tmp_path / "other")
    with pytest.raises(TokenmillError, match="another tokenizer"):
        pack_documents(shards, other, out)


def test_pack_output_does_not_depend_on_workers(shards, tokenizer, packed, tmp_path):
    pack_documents(shards, tokenizer, tmp_path, batch_docs=16, workers=3)
    for name in ("shard-00000.bin", "shard-00002.bin", "index.parquet", "meta.json"):
        assert (tmp_path / name).read_bytes() == (packed / name).read_bytes()


def test_pack_rejects_shards_without_core_columns(tokenizer, tmp_path):
    pq.write_table(make_table(make_docs("a", 2, seed=0)).drop(["domain"]), tmp_path / "bad.parquet")
    with pytest.raises(TokenmillError, match="bad.parquet.*domain"):
        pack_documents([tmp_path / "bad.parquet"], tokenizer, tmp_path / "out")


# ---- loader ----------------------------------------------------------------------------------------


def batches(loader: TokenLoader, steps: range) -> list[tuple[torch.Tensor, ...]]:
    return [loader.batch(step) for step in steps]


def test_loader_windows_come_from_domain_streams_one_epoch_at_a_time(shards, tokenizer, packed):
    dataset = TokenDataset(packed)
    loader = TokenLoader(dataset, SEQ_LEN, 8, seed=0, domain_weights={"a": 1.0})
    stream = domain_stream(shards, tokenizer, "a")
    windows = stream[: len(stream) // (SEQ_LEN + 1) * (SEQ_LEN + 1)].reshape(-1, SEQ_LEN + 1)
    seen = []
    for x, y, domain in batches(loader, range(-(-2 * len(windows) // 8))):
        assert x.dtype == y.dtype == domain.dtype == torch.int64 and x.shape == (8, SEQ_LEN)
        assert torch.equal(x[:, 1:], y[:, :-1]) and (domain == loader.domains.index("a")).all()
        seen += [tuple(row) for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]
    epoch = len(windows)
    assert sorted(seen[:epoch]) == sorted(map(tuple, windows.tolist()))
    assert sorted(seen[epoch : 2 * epoch]) == sorted(map(tuple, windows.tolist()))
    assert seen[:epoch] != seen[epoch : 2 * epoch]  # reshuffled, not replayed


def test_loader_is_deterministic_and_seeded(packed):
    dataset = TokenDataset(packed)
    make = lambda seed: TokenLoader(dataset, SEQ_LEN, 4, seed=seed, domain_weights={"a": 1, "b": 1})
    first, again, other = (batches(make(seed), range(5)) for seed in (7, 7, 8))
    assert all(torch.equal(p, q) for batch, repeat in zip(first, again) for p, q in zip(batch, repeat))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(first, other))


def test_loader_resumes_where_it_stopped(packed):
    dataset = TokenDataset(packed)
    make = lambda: TokenLoader(dataset, SEQ_LEN, 4, seed=1, domain_weights={"a": 3, "b": 1})
    uninterrupted = iter(make())
    expected = [next(uninterrupted) for _ in range(6)]
    interrupted = make()
    for _, _batch in zip(range(3), interrupted):
        pass
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    resumed_iter = iter(resumed)
    got = [next(resumed_iter) for _ in range(3)]
    assert all(torch.equal(p, q) for batch, want in zip(got, expected[3:]) for p, q in zip(batch, want))
    with pytest.raises(TokenmillError, match="seed was 1 now 2"):
        other_seed = TokenLoader(dataset, SEQ_LEN, 4, seed=2, domain_weights={"a": 3, "b": 1})
        other_seed.load_state_dict(interrupted.state_dict())


def test_loader_honours_domain_weights(packed):
    dataset = TokenDataset(packed)
    only_a = TokenLoader(dataset, SEQ_LEN, 64, seed=0, domain_weights={"a": 1.0, "b": 0.0})
    assert all((domain == only_a.domains.index("a")).all() for _, _, domain in batches(only_a, range(20)))
    mixed = TokenLoader(dataset, SEQ_LEN, 64, seed=0, domain_weights={"a": 0.75, "b": 0.25})
    drawn = torch.cat([domain for _, _, domain in batches(mixed, range(40))])
    assert abs((drawn == mixed.domains.index("a")).float().mean().item() - 0.75) < 0.03


def test_natural_mixture_follows_token_counts(packed):
    dataset = TokenDataset(packed)
    with pytest.raises(TokenmillError, match="tiny"):  # natural weights give the tiny domain a share
        TokenLoader(dataset, SEQ_LEN, 64, seed=0)
    loader = TokenLoader(dataset, 1, 64, seed=0)
    drawn = torch.cat([domain for _, _, domain in batches(loader, range(40))])
    share_a = dataset.n_tokens("a") / sum(dataset.n_tokens(d) for d in dataset.domains)
    assert abs((drawn == loader.domains.index("a")).float().mean().item() - share_a) < 0.03


def test_ranks_split_the_global_batch(packed):
    dataset = TokenDataset(packed)
    weights = {"a": 0.5, "b": 0.5}
    single = TokenLoader(dataset, SEQ_LEN, 12, seed=3, domain_weights=weights)
    ranks = [
        TokenLoader(dataset, SEQ_LEN, 4, seed=3, domain_weights=weights, rank=rank, world_size=3)
        for rank in range(3)
    ]
    for step in (0, 5):
        whole = single.batch(step)
        parts = [loader.batch(step) for loader in ranks]
        for i in range(3):
            assert torch.equal(torch.cat([part[i] for part in parts]), whole[i])


def test_loader_rejects_bad_mixtures(packed):
    dataset = TokenDataset(packed)
    with pytest.raises(TokenmillError, match=r"unknown domain\(s\) \['c'\].*'a', 'b', 'tiny'"):
        TokenLoader(dataset, SEQ_LEN, 4, seed=0, domain_weights={"a": 1, "c": 1})
    with pytest.raises(TokenmillError, match="fewer tokens than one window"):
        TokenLoader(dataset, SEQ_LEN, 4, seed=0, domain_weights={"a": 1, "tiny": 0.1})
    with pytest.raises(TokenmillError, match=">= 0"):
        TokenLoader(dataset, SEQ_LEN, 4, seed=0, domain_weights={"a": 1, "b": -1})
    with pytest.raises(TokenmillError, match="no meta.json"):
        TokenDataset(packed / "nowhere")


def test_eval_windows_are_fixed_stream_slices(shards, tokenizer, packed):
    dataset = TokenDataset(packed)
    windows = eval_windows(dataset, SEQ_LEN, max_windows_per_domain=5)
    assert set(windows) == {"a", "b"}  # 'tiny' is shorter than one window
    stream = domain_stream(shards, tokenizer, "b")
    cut = {tuple(stream[i : i + SEQ_LEN + 1]) for i in range(0, len(stream) - SEQ_LEN, SEQ_LEN + 1)}
    x, y = windows["b"]
    assert x.shape == (5, SEQ_LEN) and torch.equal(x[:, 1:], y[:, :-1])
    assert all(tuple(row) in cut for row in torch.cat([x, y[:, -1:]], dim=1).tolist())
    assert torch.equal(eval_windows(dataset, SEQ_LEN, 5)["b"][0], x)
