"""Score stage: CLIP similarity and ITM match probability for every (image, caption) pair.

    images/<shard> + captions/<shard> ──► pairs ──► map_batches(ScoreActor, actor pool, GPU per
    actor when present) ──► driver groups by shard ──► scores/<shard>.parquet
                                                   └─► rejected/score/<shard>.parquet

Pure parts: `shard_pairs` (join a shard's captions with its images) and `score_pairs` (one batch
of pairs through a CLIP scorer and an optional ITM scorer). `ScoreActor` holds the models
(loaded once per actor); `run` hands the pending shards, the reader, the actor and the
per-shard commit to the driver every model-holding stage shares (`pipeline.model_stage`, as the
caption stage does). Accounting is per caption row: rows in = captions, kept = scored pairs,
failed = pairs whose image could not be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from capfilt.errors import ConfigError
from pipeline.caption import decode_image
from pipeline.model_stage import ModelStage, ShardActor, check_actor_settings, run_model_stage
from pipeline.run_store import RunStore, ShardCounts, config_hash
from pipeline.summary import StageSummary
from schemas import CAPTIONS, IMAGES, SCORES

STAGE = "score"

PAIR_COLUMNS = ["sample_id", "caption_id", "caption_source", "caption", "degenerate"]


@dataclass(frozen=True)
class ScoreConfig:
    clip: str
    clip_pretrained: str | None = None
    clip_config: str | None = None  # JSON file/folder of open_clip model configs to register first
    itm: str | None = None
    batch_size: int = 64
    actors: int | None = None
    cpus_per_actor: int = 1
    device: str = "auto"
    executor: str = "auto"  # "ray", "local" (the driver process) or "auto": pipeline/model_stage.py

    def __post_init__(self):
        if not self.clip:
            raise ConfigError("--clip is required: an open_clip model name such as ViT-L-14.")
        check_actor_settings(self.batch_size, self.actors, self.cpus_per_actor, self.executor)

    @property
    def output_hash(self) -> str:
        return config_hash({"clip": self.clip, "pretrained": self.clip_pretrained, "itm": self.itm})

    def load(self):
        from model.scorers import load_clip, load_itm

        clip = load_clip(self.clip, self.clip_pretrained, self.device, self.clip_config)
        itm = load_itm(self.itm, self.device) if self.itm else None
        return clip, itm


# -- pure functions ------------------------------------------------------------------------------
def shard_pairs(images: pa.Table, captions: pa.Table) -> pa.Table:
    """Every caption row of a shard with its image's bytes, in the captions' order."""
    image_of = dict(zip(images.column("sample_id").to_pylist(), images.column("image").to_pylist()))
    pairs = captions.select(PAIR_COLUMNS)
    return pairs.append_column("image", pa.array([image_of.get(s) for s in pairs.column("sample_id").to_pylist()], pa.binary()))


def score_pairs(pairs: pa.Table, clip, itm=None) -> pa.Table:
    """Scores for a batch of pairs; each image is decoded, preprocessed and CLIP-embedded once.

    Returns the pair columns plus clip_score, itm_score, image_embedding and `error` (set, with
    scores null, when the image cannot be decoded).
    """
    sample_ids = pairs.column("sample_id").to_pylist()
    data = pairs.column("image").to_pylist()
    decoded: dict[str, object] = {}
    errors: dict[str, str] = {}
    for sid, blob in zip(sample_ids, data):
        if sid in decoded or sid in errors:
            continue
        try:
            decoded[sid] = decode_image(blob)
        except Exception as exc:  # noqa: BLE001 - any decoder complaint becomes the row's error
            errors[sid] = f"{type(exc).__name__}: {exc}"
    good = list(decoded)
    image_emb = dict(zip(good, clip.embed_images([decoded[s] for s in good]))) if good else {}
    ok = [i for i, s in enumerate(sample_ids) if s in decoded]
    texts = pairs.column("caption").to_pylist()
    clip_scores = [None] * len(sample_ids)
    itm_scores = [None] * len(sample_ids)
    embeddings = [None] * len(sample_ids)
    if ok:
        text_emb = clip.embed_texts([texts[i] or "" for i in ok])
        for row, i in enumerate(ok):
            emb = image_emb[sample_ids[i]]
            clip_scores[i] = float(np.dot(emb, text_emb[row]))
            embeddings[i] = emb.astype(np.float16)
        if itm is not None:
            slot = {s: k for k, s in enumerate(good)}  # each decoded image given once, named by its pairs
            # an out-of-fold filter (model/folds.py) picks its model by the image's sample id
            keys = {"keys": good} if itm.keyed else {}
            probs = itm.match_probability_of([decoded[s] for s in good], [slot[sample_ids[i]] for i in ok],
                                             [texts[i] or "" for i in ok], **keys)
            for row, i in enumerate(ok):
                itm_scores[i] = float(probs[row])
    out = pairs.drop_columns(["image"])
    out = out.append_column("clip_score", pa.array(clip_scores, pa.float32()))
    out = out.append_column("itm_score", pa.array(itm_scores, pa.float32()))
    out = out.append_column("image_embedding", pa.array(embeddings, pa.list_(pa.float16())))
    return out.append_column("error", pa.array([errors.get(s) for s in sample_ids], pa.string()))


def split_scored(shard: str, scored: pa.Table) -> tuple[pa.Table, pa.Table, ShardCounts]:
    """Scored pairs -> (scores rows, rejected rows, counts)."""
    failed_mask = scored.column("error").is_valid()
    good = scored.filter(pa.compute.invert(failed_mask))
    bad = scored.filter(failed_mask).to_pylist()
    rejected = pa.Table.from_pylist([
        {"stage": STAGE, "shard": shard, "sample_id": r["sample_id"], "caption_id": r["caption_id"],
         "caption": r["caption"], "outcome": "failed", "reason": "undecodable_image",
         "error_message": f"sample {r['sample_id']} in images/{shard}.parquet: {r['error']}"}
        for r in bad
    ])
    counts = ShardCounts(rows_in=scored.num_rows, kept=good.num_rows, failed=len(bad))
    return SCORES.conform(good), rejected if bad else None, counts


# -- Ray ---------------------------------------------------------------------------------------------
def read_pair_shards(batch: pa.Table, root: str, run_id: str) -> pa.Table:
    """Ray map_batches function: shard ids -> that shard's pairs (image bytes included)."""
    store = RunStore(root, run_id)
    tables = []
    for shard in batch.column("shard").to_pylist():
        pairs = shard_pairs(store.read_shard("images", shard, IMAGES), store.read_shard("captions", shard, CAPTIONS))
        tables.append(pairs.append_column("shard", pa.array([shard] * pairs.num_rows, pa.string())))
    return pa.concat_tables(tables)


class ScoreActor(ShardActor):
    """Holds the CLIP and ITM models (loaded once per actor); scores `batch_size` pairs per forward pass."""

    def __init__(self, config: ScoreConfig, **shard_actor):
        super().__init__(**shard_actor)
        self.clip, self.itm = config.load()

    def batch(self, rows: pa.Table) -> pa.Table:
        return score_pairs(rows, self.clip, self.itm)


@dataclass
class ScoreSummary(StageSummary):  # rows: (image, caption) pairs; kept: pairs scored
    def line(self) -> str:
        return (f"scored {self.shards_done} shard(s), skipped {self.shards_skipped} already done: "
                f"{self.counts('pairs', 'scored')}" + self.note())


def run(store: RunStore, cfg: ScoreConfig) -> ScoreSummary:
    """Score every captioned shard of a run not already scored with this config."""
    captioned = [r.shard for r in store.records("caption") if r.status == "done"]
    if not captioned:
        raise ConfigError(
            f"run '{store.run_id}' under {store.root} has no captioned shards; run `capfilt caption` first."
        )
    todo = [s for s in captioned if not store.is_done(STAGE, s, cfg.output_hash)]
    summary = ScoreSummary(shards_skipped=len(captioned) - len(todo))
    if not todo:
        return summary
    run_model_stage(store, ModelStage(
        name=STAGE, output_hash=cfg.output_hash,
        rows={shard: store.read_shard("captions", shard, CAPTIONS).num_rows for shard in todo},
        read=read_pair_shards, actor=ScoreActor, actor_kwargs=dict(config=cfg),
        commit=lambda shard, scored: _commit(store, cfg, shard, scored, summary),
        check=cfg.load,  # a bad --clip/--itm fails here, in one line, before Ray starts
        batch_size=cfg.batch_size, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor, executor=cfg.executor,
    ), run=summary)
    return summary


def _commit(store: RunStore, cfg: ScoreConfig, shard: str, scored: pa.Table | None, summary: ScoreSummary) -> None:
    if scored is not None:
        # Back to the captions' order: the output does not depend on how Ray streamed batches.
        order = {cid: i for i, cid in enumerate(store.read_shard("captions", shard, CAPTIONS).column("caption_id").to_pylist())}
        ids = scored.column("caption_id").to_pylist()
        scored = scored.take(pa.array(sorted(range(scored.num_rows), key=lambda i: order[ids[i]])))
        scores, rejected, counts = split_scored(shard, scored)
    else:
        scores, rejected, counts = SCORES.empty(), None, ShardCounts(rows_in=0, kept=0)
    store.commit_shard(STAGE, shard, cfg.output_hash, outputs={"scores": (SCORES, scores)}, counts=counts, rejected=rejected)
    summary.add(counts, rejected)


def adopt_scores(store: RunStore, from_run: str) -> int:
    """Take another run's captions and scores as this run's own (linked, not copied): an ablation
    arm that differs from `from_run` only in its selection (same images, same captions, same
    scores), as BLIP's Table 1 compares filters on one set of captions. Both runs must hold the
    same images (e.g. both ingested with --from-run of one round 0). Returns shards taken."""
    source = RunStore(store.root, from_run)
    scored = {r.shard: r for r in source.records(STAGE) if r.status == "done"}
    captioned = {r.shard: r for r in source.records("caption") if r.status == "done"}
    if not scored:
        raise ConfigError(f"--from-run {from_run}: run '{from_run}' under {store.root} has no scored shards; "
                          f"run `capfilt filter --run {from_run}` first.")
    mine = sorted(r.shard for r in store.records("ingest") if r.status == "done")
    if not mine:
        raise ConfigError(f"run '{store.run_id}' under {store.root} has no images; ingest it first "
                          f"(capfilt ingest --from-run <the round-0 run of {from_run}> --run {store.run_id}).")
    missing = [s for s in mine if s not in scored or s not in captioned]
    if missing:
        raise ConfigError(f"--from-run {from_run}: shard(s) {', '.join(missing[:3])} of run '{store.run_id}' are not "
                          f"captioned and scored in '{from_run}'; finish `capfilt filter --run {from_run}` first.")

    def sample_ids(run: RunStore, shard: str) -> list[str]:
        import pyarrow.parquet as pq

        with run.fs.open(run.shard_path("images", shard), "rb") as handle:
            return sorted(pq.read_table(handle, columns=["sample_id"]).column("sample_id").to_pylist())

    for shard in mine:
        if sample_ids(store, shard) != sample_ids(source, shard):
            raise ConfigError(f"--from-run {from_run}: shard {shard} holds other images than run '{store.run_id}'s; "
                              "both runs must ingest the same images (capfilt ingest --from-run of one run).")
    taken = 0
    for shard in mine:
        for stage, artifact, record in (("caption", "captions", captioned[shard]), (STAGE, "scores", scored[shard])):
            if not store.is_done(stage, shard, record.config_hash):
                store.adopt_shard(source, stage, shard, (artifact,), record.config_hash, extra={"scores_from": from_run})
                taken += 1
    return taken
