"""Dedup: exact duplicates by sha256 and semantic near-duplicates by CLIP image embeddings.

Runs over the whole run, not one shard. Exact: images with the same sha256 of their downloaded
bytes. Semantic (SemDeDup): k-means over the L2-normalised CLIP image embeddings with faiss, then
within each cluster every pair with cosine similarity above 1 - eps; in each such pair the image
that sorts later by sample_id is dropped as a duplicate of the earlier one, so the result does
not depend on shard order. faiss uses the GPU when it has one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from capfilt.errors import ConfigError
from pipeline.run_store import RunStore, ShardCounts, config_hash
from pipeline.summary import StageSummary
from schemas import DEDUP, IMAGES, SCORES

STAGE = "dedup"
SHARD = "all"


@dataclass(frozen=True)
class DedupConfig:
    eps: float = 0.02          # near-duplicate when cosine similarity > 1 - eps
    cluster_size: int = 1000   # average points per k-means cluster (k = n / cluster_size)
    kmeans_iters: int = 20
    seed: int = 0
    semantic: bool = True

    def __post_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"--dedup-eps must be in [0, 1) (got {self.eps}).")
        if self.cluster_size < 2:
            raise ConfigError(f"--dedup-cluster-size must be >= 2 (got {self.cluster_size}).")


def exact_duplicates(sample_ids: list[str], sha256s: list[str | None]) -> dict[str, str]:
    """sample_id -> the first (smallest) sample_id with the same sha256."""
    first: dict[str, str] = {}
    duplicates = {}
    for sid, digest in sorted(zip(sample_ids, sha256s)):
        if digest is None:
            continue
        if digest in first:
            duplicates[sid] = first[digest]
        else:
            first[digest] = sid
    return duplicates


def _pairs_within(ids: list[str], vectors: np.ndarray, threshold: float, duplicates: dict, similarity: dict) -> None:
    """Mark, in sample_id order, each vector too close to an earlier kept one."""
    order = np.argsort(np.array(ids, dtype=object))
    vectors = vectors[order]
    ids = [ids[i] for i in order]
    sims = vectors @ vectors.T
    kept: list[int] = []
    for j in range(len(ids)):
        if kept:
            row = sims[j, kept]
            best = int(np.argmax(row))
            if row[best] > threshold:
                duplicates[ids[j]] = ids[kept[best]]
                similarity[ids[j]] = float(row[best])
                continue
        kept.append(j)


def semantic_duplicates(sample_ids: list[str], embeddings: np.ndarray, cfg: DedupConfig) -> tuple[dict[str, str], dict[str, float]]:
    """SemDeDup with faiss k-means: sample_id -> kept sample_id, and the similarity of each pair."""
    import faiss

    duplicates: dict[str, str] = {}
    similarity: dict[str, float] = {}
    n = len(sample_ids)
    if n < 2:
        return duplicates, similarity
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    k = max(1, math.ceil(n / cfg.cluster_size))
    if k == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=cfg.kmeans_iters, seed=cfg.seed, spherical=True,
                              gpu=faiss.get_num_gpus() > 0, verbose=False)
        kmeans.train(x)
        _, labels = kmeans.index.search(x, 1)
        labels = labels[:, 0]
    threshold = 1.0 - cfg.eps
    for cluster in np.unique(labels):
        members = np.nonzero(labels == cluster)[0]
        if len(members) > 1:
            _pairs_within([sample_ids[i] for i in members], x[members], threshold, duplicates, similarity)
    return duplicates, similarity


def brute_force_duplicates(sample_ids: list[str], embeddings: np.ndarray, eps: float) -> dict[str, str]:
    """The exact answer SemDeDup approximates (all pairs): for tests and the benchmark."""
    duplicates: dict[str, str] = {}
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    _pairs_within(list(sample_ids), x, 1.0 - eps, duplicates, {})
    return duplicates


def find_duplicates(sample_ids: list[str], sha256s: list[str | None], embeddings: np.ndarray | None, cfg: DedupConfig) -> pa.Table:
    """The `dedup` table: exact duplicates first, then semantic ones among the rest."""
    exact = exact_duplicates(sample_ids, sha256s)
    rows = [{"sample_id": s, "duplicate_of": d, "kind": "exact", "similarity": 1.0} for s, d in sorted(exact.items())]
    if cfg.semantic and embeddings is not None and len(sample_ids):
        keep = [i for i, s in enumerate(sample_ids) if s not in exact]
        semantic, sims = semantic_duplicates([sample_ids[i] for i in keep], embeddings[keep], cfg)
        rows += [{"sample_id": s, "duplicate_of": d, "kind": "semantic", "similarity": sims[s]}
                 for s, d in sorted(semantic.items())]
    return DEDUP.from_pylist(rows)


@dataclass
class DedupSummary(StageSummary):  # rows: the run's scored images; dropped: {"duplicate": n}
    exact: int = 0
    semantic: int = 0

    def line(self) -> str:
        done = "done" if self.shards_done else "already done, skipped"
        return f"dedup ({done}): {self.counts('images')}; {self.exact} exact, {self.semantic} semantic duplicate(s)"


def run(store: RunStore, cfg: DedupConfig) -> DedupSummary:
    """Dedup a scored run (all shards together); skipped when done with the same inputs. The
    duplicates are the run's dedup/ table (and rejected/dedup/)."""
    scored = sorted(r.shard for r in store.records("score") if r.status == "done")
    upstream = [store.record("score", s).config_hash for s in scored]
    cfg_hash = config_hash({"dedup": cfg, "score_shards": scored, "score_hashes": upstream})
    summary = DedupSummary()
    if store.is_done(STAGE, SHARD, cfg_hash):
        record = store.record(STAGE, SHARD)
        summary.shards_skipped, summary.rows_in, summary.kept = 1, record.rows_in or 0, record.kept or 0
        return _tally(summary, store.read_shard("dedup", SHARD, DEDUP))
    store.start_shard(STAGE, SHARD, cfg_hash)
    sample_ids, sha256s, vectors = [], [], []
    for shard in scored:
        images = store.read_shard("images", shard, IMAGES).select(["sample_id", "sha256"])
        scores = store.read_shard("scores", shard, SCORES).select(["sample_id", "image_embedding"])
        embedding_of = {}
        for sid, emb in zip(scores.column("sample_id").to_pylist(), scores.column("image_embedding").to_pylist()):
            if emb is not None and sid not in embedding_of:
                embedding_of[sid] = emb
        for sid, digest in zip(images.column("sample_id").to_pylist(), images.column("sha256").to_pylist()):
            if sid in embedding_of:  # images that failed scoring are accounted for there
                sample_ids.append(sid)
                sha256s.append(digest)
                vectors.append(embedding_of[sid])
    embeddings = np.asarray(vectors, dtype=np.float32) if vectors else None
    table = find_duplicates(sample_ids, sha256s, embeddings, cfg)
    rejected = pa.Table.from_pylist([
        {"stage": STAGE, "shard": SHARD, "sample_id": r["sample_id"], "outcome": "dropped", "reason": "duplicate",
         "error_message": f"{r['kind']} duplicate (similarity {r['similarity']:.4f})", "duplicate_of": r["duplicate_of"]}
        for r in table.to_pylist()
    ]) if table.num_rows else None
    counts = ShardCounts(rows_in=len(sample_ids), kept=len(sample_ids) - table.num_rows, rejected=table.num_rows)
    store.commit_shard(STAGE, SHARD, cfg_hash, outputs={"dedup": (DEDUP, table)}, counts=counts, rejected=rejected)
    summary.shards_done, summary.rows_in, summary.kept = 1, counts.rows_in, counts.kept
    return _tally(summary, table)


def _tally(summary: DedupSummary, table: pa.Table) -> DedupSummary:
    kinds = table.column("kind").to_pylist()
    summary.exact, summary.semantic = kinds.count("exact"), kinds.count("semantic")
    if kinds:
        summary.dropped["duplicate"] = len(kinds)
    return summary
