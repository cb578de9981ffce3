"""Caption stage: for every ingested image keep its web caption and add N synthetic captions.

    images/<shard>.parquet ──► read_parquet ──► map_batches(CaptionActor, actor pool, GPU per
    actor when present) ──► driver groups results by shard ──► captions/<shard>.parquet
                                                           └─► rejected/caption/<shard>.parquet

Pure parts (testable without Ray): `decode_image`, `degenerate_reason`, `caption_batch` (one
batch of images through a captioner) and `assemble_shard` (per-image results -> caption rows,
rejected rows and counts). `CaptionActor` holds the captioner; `run` hands the pending
shards, the reader, the actor and the per-shard commit to the driver every model-holding stage
shares (`pipeline.model_stage`: one dataset over all pending shards, each shard committed as soon
as all its images are in). Output rows do not depend on Ray's batching (see
`model.captioners.SeededNucleusSampler`), so neither the streaming order nor a resume changes
what is written: rows are put back in the shard's order before they are written.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from PIL import Image

from capfilt.errors import ConfigError, SchemaError
from model.captioners import Captioner, Decoding, caption_seed, captioner_model_type, load_captioner
from pipeline.model_stage import ModelStage, ShardActor, check_actor_settings, run_model_stage
from pipeline.run_store import RunStore, ShardCounts, config_hash
from pipeline.summary import StageSummary
from schemas import CAPTIONS, IMAGES, REJECTED

STAGE = "caption"
UNDECODABLE = "undecodable_image"

# what the actors return per image (the image bytes stay behind)
RESULT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("error", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("seeds", pa.list_(pa.int64())),
    ]
)


WEB_ONLY = "none"


@dataclass(frozen=True)
class CaptionConfig:
    """The caption stage's settings. Only `captioner` and `decoding` change what is written."""

    captioner: str  # WEB_ONLY: no model, the web caption passes through alone (bootstrap round 0)
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int = 16
    actors: int | None = None  # default: one per GPU, else one
    cpus_per_actor: int = 1  # CPU cores (= torch threads on CPU) each actor reserves
    device: str = "auto"
    executor: str = "auto"  # "ray", "local" (the driver process) or "auto": pipeline/model_stage.py

    def __post_init__(self):
        if not self.captioner:
            raise ConfigError("--captioner is required: a hub id or a folder written by save_pretrained.")
        check_actor_settings(self.batch_size, self.actors, self.cpus_per_actor, self.executor)

    @property
    def web_only(self) -> bool:
        return self.captioner.lower() == WEB_ONLY

    @property
    def output_hash(self) -> str:
        """Hash of what determines the output: a rerun with another batch size or pool is a no-op."""
        if self.web_only:
            return config_hash({"captioner": WEB_ONLY})
        return config_hash({"captioner": self.captioner, "decoding": self.decoding})


# -- pure functions ------------------------------------------------------------------------------
def decode_image(data: bytes | None) -> Image.Image:
    """Decode image bytes fully (a truncated file fails here, not later) into RGB."""
    if not data:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


_WORD = re.compile(r"\w+", re.UNICODE)


def degenerate_reason(caption: str | None) -> str | None:
    """Why a generated caption is useless, or None: empty, punctuation_only or repeated_token.

    repeated_token: one word makes up the whole caption ("dog dog dog") or repeats four or more
    times in a row ("a red red red red circle"), the usual failure of a sampling decoder.
    """
    text = (caption or "").strip()
    if not text:
        return "empty"
    if not any(unicodedata.category(ch)[0] in "LN" for ch in text):
        return "punctuation_only"
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 2 and len(set(words)) == 1:
        return "repeated_token"
    run = 1
    for previous, current in zip(words, words[1:]):
        run = run + 1 if current == previous else 1
        if run >= 4:
            return "repeated_token"
    return None


def caption_batch(batch: pa.Table, captioner: Captioner | None, decoding: Decoding) -> pa.Table:
    """One batch of images (sample_id, image) -> per image: error or N captions and their seeds.

    Every image is decoded once; the decodable ones go through the captioner as one batch.
    """
    sample_ids = batch.column("sample_id").to_pylist()
    errors: list[str | None] = [None] * len(sample_ids)
    images, positions = [], []
    for i, data in enumerate(batch.column("image").to_pylist()):
        try:
            images.append(decode_image(data))
            positions.append(i)
        except Exception as exc:  # noqa: BLE001 - any decoder complaint makes this one image fail
            errors[i] = f"{type(exc).__name__}: {exc}"
    seeds = [[caption_seed(decoding.seed, sid, j) for j in range(decoding.num_captions)] for sid in sample_ids]
    captions: list[list[str] | None] = [None] * len(sample_ids)
    if captioner is None:  # web-only: images are still decoded, so a broken one fails here as it would
        generated, seeds = [[] for _ in positions], [[] for _ in sample_ids]
    else:
        generated = captioner.caption(images, decoding, [seeds[i] for i in positions])
    for i, texts in zip(positions, generated):
        captions[i] = texts
    return pa.Table.from_pydict(
        {
            "sample_id": sample_ids,
            "error": errors,
            "captions": captions,
            "seeds": [s if c is not None else None for s, c in zip(seeds, captions)],
        },
        schema=RESULT_SCHEMA,
    )


def assemble_shard(
    shard: str, images: pa.Table, results: pa.Table, captioner_id: str, decoding: Decoding
) -> tuple[pa.Table, pa.Table, ShardCounts]:
    """Per-image results of one shard -> (captions, rejected, counts), in the shard's row order.

    `images` holds the shard's sample_id, url and caption columns; every one of its rows must
    have exactly one result.
    """
    by_id = {}
    for row in results.to_pylist():
        if row["sample_id"] in by_id:
            raise RuntimeError(f"shard '{shard}': image {row['sample_id']} was captioned twice")
        by_id[row["sample_id"]] = row
    caption_rows, rejected_rows = [], []
    decoding_json = decoding.to_json()
    for image in images.select(["sample_id", "url", "caption"]).to_pylist():
        sid = image["sample_id"]
        result = by_id.pop(sid, None)
        if result is None:
            raise RuntimeError(f"shard '{shard}': no caption result for image {sid}")
        if result["error"] is not None:
            rejected_rows.append(
                dict(
                    stage=STAGE, shard=shard, sample_id=sid, url=image["url"], caption=image["caption"],
                    outcome="failed", reason=UNDECODABLE,
                    error_message=(
                        f"image {sid} of images/{shard}.parquet could not be decoded "
                        f"({result['error']}); re-ingest it or drop it from the source"
                    ),
                )
            )
            continue
        caption_rows.append(
            dict(sample_id=sid, caption_id=f"{sid}#web", caption_source="web", caption_index=0,
                 caption=image["caption"])
        )
        for j, (text, seed) in enumerate(zip(result["captions"], result["seeds"]), start=1):
            caption_rows.append(
                dict(sample_id=sid, caption_id=f"{sid}#syn{j}", caption_source="synthetic",
                     caption_index=j, caption=text, captioner=captioner_id, decoding=decoding_json,
                     seed=seed, degenerate=degenerate_reason(text))
            )
    if by_id:
        raise RuntimeError(f"shard '{shard}': results for images not in the shard: {sorted(by_id)[:3]}")
    counts = ShardCounts(
        rows_in=images.num_rows,
        kept=images.num_rows - len(rejected_rows),
        failed=len(rejected_rows),
        rows_out=len(caption_rows),
    )
    return CAPTIONS.from_pylist(caption_rows), REJECTED.from_pylist(rejected_rows), counts


# -- Ray wrapper -----------------------------------------------------------------------------------
def read_image_shards(batch: pa.Table, root: str, run_id: str) -> pa.Table:
    """Shard ids -> the (shard, sample_id, image) rows of those images/ shards, schema-checked."""
    store = RunStore(root, run_id)
    tables = []
    for shard in batch.column("shard").to_pylist():
        images = store.read_shard("images", shard, IMAGES).select(["sample_id", "image"])
        tables.append(images.append_column("shard", pa.array([shard] * images.num_rows, pa.string())))
    return pa.concat_tables(tables)


class CaptionActor(ShardActor):
    """Loads the captioner once per actor (none for --captioner none); captions `batch_size` images
    per generate call."""

    def __init__(self, captioner: str, decoding: Decoding, device: str = "auto", **shard_actor):
        super().__init__(**shard_actor)
        self.captioner = None if captioner.lower() == WEB_ONLY else load_captioner(captioner, device)
        self.decoding = decoding

    def batch(self, rows: pa.Table) -> pa.Table:
        return caption_batch(rows, self.captioner, self.decoding)


# -- driver ------------------------------------------------------------------------------------------
@dataclass
class CaptionSummary(StageSummary):  # rows: images; kept: images captioned
    shards_not_ingested: int = 0
    web_captions: int = 0
    synthetic_captions: int = 0
    degenerate: int = 0

    def line(self) -> str:
        return (
            f"captioned {self.shards_done} shard(s), skipped {self.shards_skipped} already done"
            + (f", {self.shards_not_ingested} not yet ingested" if self.shards_not_ingested else "")
            + f": {self.counts('images', 'captioned')}; "
            f"{self.web_captions + self.synthetic_captions} caption rows = {self.web_captions} web + "
            f"{self.synthetic_captions} synthetic ({self.degenerate} degenerate)" + self.note()
        )


def pending_shards(store: RunStore, cfg: CaptionConfig) -> tuple[list[str], list[str], list[str]]:
    """(to caption, already done with this config, not ingested yet) among the run's image shards."""
    todo, done, not_ready = [], [], []
    for shard in store.shards("images"):
        ingest = store.record("ingest", shard)
        if ingest is None or ingest.status != "done":
            not_ready.append(shard)
        elif store.is_done(STAGE, shard, cfg.output_hash):
            done.append(shard)
        else:
            todo.append(shard)
    return todo, done, not_ready


def _read_columns(store: RunStore, shard: str, columns: list[str]) -> pa.Table:
    with store.fs.open(store.shard_path("images", shard), "rb") as handle:
        return pq.read_table(handle, columns=columns)


def _commit(store: RunStore, cfg: CaptionConfig, shard: str, results: pa.Table | None, summary: CaptionSummary) -> None:
    images = _read_columns(store, shard, ["sample_id", "url", "caption"])
    if results is None:
        results = RESULT_SCHEMA.empty_table()
    results = results.select(RESULT_SCHEMA.names)
    captions, rejected, counts = assemble_shard(shard, images, results, cfg.captioner, cfg.decoding)
    decoding = None if cfg.web_only else json.loads(cfg.decoding.to_json())
    store.commit_shard(
        STAGE, shard, cfg.output_hash, outputs={"captions": (CAPTIONS, captions)}, counts=counts,
        rejected=rejected, extra={"captioner": cfg.captioner, "decoding": decoding},
    )
    summary.add(counts, rejected)
    sources = captions.column("caption_source").to_pylist()
    summary.web_captions += sources.count("web")
    summary.synthetic_captions += sources.count("synthetic")
    summary.degenerate += captions.num_rows - captions.column("degenerate").null_count


def run(store: RunStore, cfg: CaptionConfig) -> CaptionSummary:
    """Caption every ingested image shard of a run not already captioned with this config."""
    if not cfg.web_only:
        captioner_model_type(cfg.captioner)  # a bad --captioner fails here, before Ray starts
    todo, done, not_ready = pending_shards(store, cfg)
    if not (todo or done or not_ready):
        raise ConfigError(
            f"run '{store.run_id}' under {store.root} has no images/ shards; run `capfilt ingest` "
            f"for it first, or check --root and --run."
        )
    summary = CaptionSummary(shards_skipped=len(done), shards_not_ingested=len(not_ready))
    expected: dict[str, int] = {}
    for shard in todo:
        IMAGES.validate(store.uri(store.shard_path("images", shard)))
        with store.fs.open(store.shard_path("images", shard), "rb") as handle:
            expected[shard] = pq.ParquetFile(handle).metadata.num_rows
        ids = _read_columns(store, shard, ["sample_id"]).column("sample_id")
        if len(ids.unique()) != len(ids):
            raise SchemaError(
                f"{store.uri(store.shard_path('images', shard))}: sample_id is not unique within the "
                f"shard; re-run `capfilt ingest` for this run."
            )
    run_model_stage(store, ModelStage(
        name=STAGE, output_hash=cfg.output_hash, rows=expected, read=read_image_shards, actor=CaptionActor,
        actor_kwargs=dict(captioner=cfg.captioner, decoding=cfg.decoding, device=cfg.device),
        commit=lambda shard, results: _commit(store, cfg, shard, results, summary),
        batch_size=cfg.batch_size, actors=cfg.actors, cpus_per_actor=cfg.cpus_per_actor,
        # no model to spread over Ray: the driver decode-checks and passes the web captions through
        executor="local" if cfg.web_only else cfg.executor,
    ), run=summary)
    return summary
