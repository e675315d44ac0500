"""The recipe's pack section: related-document order, streams named by another column, index fields."""

from __future__ import annotations

import json
import random
import shutil
from operator import itemgetter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_DATA, demo_docs
from pydantic import ValidationError

from tokenmill import TokenmillError
from tokenmill.documents.embed import embed_texts
from tokenmill.documents.schema import make_table
from tokenmill.recipe import parse_recipe
from tokenmill.run import Runner, _changes
from tokenmill.tokens.loader import TokenDataset
from tokenmill.tokens.order import MAX_CHARS, _top_k, greedy_path, minhash_texts
from tokenmill.tokens.pack import PackConfig, pack_documents
from tokenmill.tokens.tokenizer import train_tokenizer

GENRES = ("bible", "shakespeare", "python_docs")
RELATED = {
    "embedding": PackConfig(order="related", order_by="embedding", embedding_backend="tfidf"),
    "minhash": PackConfig(order="related", order_by="minhash"),
}


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    """Real documents of three genres in one shuffled order; most in domain "mixed", so that a related
    order has different texts to bring together, the rest in "rest"."""
    rows = []
    for genre, count in zip(GENRES, (36, 30, 30)):
        for doc in demo_docs(genre, count):
            rows.append({**doc, "meta": {"genre": genre, "n": len(rows)}})
    random.Random(0).shuffle(rows)
    return [{**row, "domain": "mixed" if i % 6 else "rest"} for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def shards(documents, tmp_path_factory) -> list:
    """Three shards, each with a ``cluster`` column (the genre's number) as the cluster step would add."""
    root = tmp_path_factory.mktemp("docs")
    paths = []
    for i in range(3):
        rows = documents[i * 32 : (i + 1) * 32]
        table = make_table(rows).append_column(
            "cluster", pa.array([GENRES.index(r["meta"]["genre"]) for r in rows], pa.int32()))
        paths.append(root / f"part-{i}.parquet")
        pq.write_table(table, paths[-1])
    return paths


@pytest.fixture(scope="module")
def tokenizer(documents, tmp_path_factory):
    return train_tokenizer([d["text"] for d in documents], 400, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def natural(shards, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("natural")
    pack_documents(shards, tokenizer, out, batch_docs=16)
    return out


@pytest.fixture(scope="module")
def related(shards, tokenizer, natural, tmp_path_factory):
    """Each related order, packed from a copy of the natural pack: its shards are reused, not re-encoded."""
    packs = {}
    for name, config in RELATED.items():
        out = tmp_path_factory.mktemp(name) / "tokens"
        shutil.copytree(natural, out)
        summary = pack_documents(shards, tokenizer, out, config=config)
        assert (summary["shards_packed"], summary["shards_skipped"]) == (0, 3)
        packs[name] = out
    return packs


def index_rows(path) -> list[dict]:
    return pq.read_table(path / "index.parquet").to_pylist()


def adjacent(order: list[int], pair_score) -> float:
    """Mean score of consecutive documents in ``order``."""
    return float(np.mean([pair_score(a, b) for a, b in zip(order, order[1:])]))


# ---- the path ---------------------------------------------------------------------------------------


def test_top_k_breaks_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    for _ in range(50):
        block = rng.integers(0, 4, (8, 30)).astype(np.float32)
        k = int(rng.integers(1, 30))
        assert (_top_k(block, k) == np.argsort(-block, axis=1, kind="stable")[:, :k]).all()


def test_greedy_path_steps_to_the_most_similar_unvisited_neighbour():
    rng = np.random.default_rng(1)
    neighbors = np.array([rng.permutation([j for j in range(30) if j != i])[:3] for i in range(30)])
    path = greedy_path(neighbors, seed=0).tolist()
    assert sorted(path) == list(range(30))
    for i, doc in enumerate(path[:-1]):
        unvisited = [j for j in neighbors[doc] if j not in path[: i + 1]]
        if unvisited:  # else the path restarts wherever the seed says
            assert path[i + 1] == unvisited[0]
    assert path == greedy_path(neighbors, seed=0).tolist() != greedy_path(neighbors, seed=1).tolist()


# ---- packing in related order -----------------------------------------------------------------------


@pytest.mark.parametrize("method", RELATED)
def test_related_order_permutes_each_domain_and_keeps_every_token(natural, related, method):
    base, out = index_rows(natural), index_rows(related[method])
    key = itemgetter("shard", "offset")
    assert sorted(map(key, out)) == sorted(map(key, base)) and base != out
    for domain in ("mixed", "rest"):  # a domain keeps its rows' positions, only their documents move
        assert [i for i, r in enumerate(out) if r["domain"] == domain] == \
            [i for i, r in enumerate(base) if r["domain"] == domain]
    for name in [f"shard-{i:05d}.bin" for i in range(3)]:
        assert (related[method] / name).read_bytes() == (natural / name).read_bytes()
    meta, base_meta = (json.loads((p / "meta.json").read_text()) for p in (related[method], natural))
    assert meta["pack"]["order"] == "related" and meta["pack"]["order_by"] == method
    assert meta["pack"].get("embedding_backend") == ("tfidf" if method == "embedding" else None)
    assert "pack" not in base_meta
    assert {k: v for k, v in meta.items() if k != "pack"} == base_meta

    # The loader reads each domain's documents in index order, however their offsets jump.
    dataset, bins = TokenDataset(related[method]), [np.fromfile(natural / n, np.uint16) for n in
                                                     [f"shard-{i:05d}.bin" for i in range(3)]]
    natural_dataset = TokenDataset(natural)
    for domain in dataset.domains:
        stream, _ = dataset.read(domain, np.arange(dataset.n_tokens(domain)))
        docs = [bins[r["shard"]][r["offset"] : r["offset"] + r["length"]] for r in out if r["domain"] == domain]
        assert stream.tolist() == np.concatenate(docs).tolist()
        before, _ = natural_dataset.read(domain, np.arange(natural_dataset.n_tokens(domain)))
        assert sorted(stream.tolist()) == sorted(before.tolist()) and len(stream) == len(before)


def test_related_neighbours_are_more_alike_than_natural_ones(documents, natural, related):
    """Measured on real text whose three genres share one domain label: every method brings alike
    documents together, by its own similarity and by the genre, which it never sees."""
    texts = {d["id"]: d["text"] for d in documents}
    genre = {d["id"]: d["meta"]["genre"] for d in documents}
    ids = [r["doc_id"] for r in index_rows(natural) if r["domain"] == "mixed"]
    vectors = dict(zip(ids, embed_texts([texts[i] for i in ids], "tfidf", max_chars=MAX_CHARS)))
    signatures = dict(zip(ids, minhash_texts([texts[i] for i in ids], seed=0)))
    scores = {"embedding": lambda a, b: float(vectors[a] @ vectors[b]),
              "minhash": lambda a, b: float((signatures[a] == signatures[b]).mean()),
              "genre": lambda a, b: float(genre[a] == genre[b])}
    orders = {"natural": ids, **{m: [r["doc_id"] for r in index_rows(related[m]) if r["domain"] == "mixed"]
                                 for m in RELATED}}
    figures = {order: {s: round(adjacent(docs, score), 3) for s, score in scores.items()}
               for order, docs in orders.items()}
    print("adjacent similarity", figures)
    for method in RELATED:
        assert figures[method][method] >= 1.5 * figures["natural"][method]
        assert figures[method]["genre"] >= 0.8 > figures["natural"]["genre"] + 0.2


def test_pack_resumes_related_order_to_the_same_index(shards, tokenizer, related, tmp_path):
    out = tmp_path / "tokens"
    shutil.copytree(related["minhash"], out)
    for name in ("shard-00001.bin", "index.parquet", "meta.json"):  # killed before the last shard was done
        (out / name).unlink()
    summary = pack_documents(shards, tokenizer, out, batch_docs=16, config=RELATED["minhash"])
    assert (summary["shards_packed"], summary["shards_skipped"]) == (1, 2)
    for name in ("shard-00001.bin", "index.parquet", "meta.json"):
        assert (out / name).read_bytes() == (related["minhash"] / name).read_bytes()


def test_default_config_packs_the_natural_order_unchanged(shards, tokenizer, natural, tmp_path):
    pack_documents(shards, tokenizer, tmp_path, batch_docs=16, config=PackConfig())
    for name in ("index.parquet", "meta.json"):
        assert (tmp_path / name).read_bytes() == (natural / name).read_bytes()
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    index = pq.read_table(natural / "index.parquet")
    assert index.column_names == ["doc_id", "domain", "shard", "offset", "length", "bytes"]
    assert index.column("doc_id").to_pylist() == [row["id"] for row in rows]


# ---- streams and index fields -----------------------------------------------------------------------


def test_domain_field_names_the_streams(shards, tokenizer, natural, tmp_path):
    meta = pack_documents(shards, tokenizer, tmp_path, config=PackConfig(domain_field="cluster"))
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    streams = pq.read_table(tmp_path / "index.parquet").column("domain").to_pylist()
    assert streams == [str(r["cluster"]) for r in rows]
    assert sorted(meta["domains"]) == ["0", "1", "2"] and meta["pack"]["domain_field"] == "cluster"
    assert meta["n_tokens"] == json.loads((natural / "meta.json").read_text())["n_tokens"]
    assert TokenDataset(tmp_path).domains == ["0", "1", "2"]


def test_a_missing_stream_column_names_the_step_that_writes_it(shards, tokenizer, tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(shards[0]).drop(["cluster"]), plain)
    with pytest.raises(TokenmillError, match=r"plain.parquet has no column 'cluster' for pack.domain_field; "
                                             r"the cluster step writes it"):
        pack_documents([plain], tokenizer, tmp_path / "a", config=PackConfig(domain_field="cluster"))
    with pytest.raises(TokenmillError, match=r"no column 'topic' for pack.domain_field; name one of its columns"):
        pack_documents([plain], tokenizer, tmp_path / "b", config=PackConfig(domain_field="topic"))
    table = pq.read_table(shards[0])
    holes = table.set_column(table.schema.get_field_index("cluster"), "cluster",
                             pa.array([None] * 2 + [1] * (table.num_rows - 2), pa.int32()))
    pq.write_table(holes, tmp_path / "holes.parquet")
    with pytest.raises(TokenmillError, match=r"2 document\(s\) of .*holes.parquet have no 'cluster' value"):
        pack_documents([tmp_path / "holes.parquet"], tokenizer, tmp_path / "c",
                       config=PackConfig(domain_field="cluster"))


def test_index_fields_copy_columns_and_meta_keys(shards, tokenizer, tmp_path):
    config = PackConfig(index_fields=["source", "meta.genre", "meta.n", "meta.absent"])
    pack_documents(shards, tokenizer, tmp_path, config=config)
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    index = pq.read_table(tmp_path / "index.parquet")
    assert index.column("source").to_pylist() == [r["source"] for r in rows] and rows[0]["source"]
    assert index.column("meta.genre").to_pylist() == [json.loads(r["meta"])["genre"] for r in rows]
    assert index.column("meta.n").to_pylist() == [str(json.loads(r["meta"])["n"]) for r in rows]
    assert set(index.column("meta.absent").to_pylist()) == {""}
    with pytest.raises(TokenmillError, match="no column 'language' for pack.index_fields"):
        pack_documents(shards, tokenizer, tmp_path / "x", config=PackConfig(index_fields=["language"]))
    for clash in (["domain"], ["source", "source"], ["meta."]):
        with pytest.raises(ValidationError, match="would repeat a column|names no key"):
            PackConfig(index_fields=clash)


# ---- the recipe -------------------------------------------------------------------------------------


def test_recipe_pack_section_and_its_fingerprint(tmp_path):
    base = {"name": "t", "sources": [{"path": str(DEMO_DATA / "bible.jsonl.gz"), "domain": "bible"}]}
    with pytest.raises(TokenmillError, match="pack.neighbours.*did you mean neighbors"):
        parse_recipe({**base, "pack": {"neighbours": 8}})
    default = dict(Runner(parse_recipe(base), tmp_path).stage_inputs())
    assert default["pack"] == {}  # as before the pack section existed: old run folders keep their tokens
    recipe = parse_recipe({**base, "pack": {"order": "related", "neighbors": 8}})
    related = dict(Runner(recipe, tmp_path).stage_inputs())
    assert related["pack"] == {"pack.order": "related", "pack.neighbors": 8}
    assert _changes(default["pack"], related["pack"]) == ["pack.neighbors null -> 8", "pack.order null -> related"]
