"""Ingest: turn a LAION-style URL source into `images/` shards with img2dataset, on Ray.

A source (one or many Parquet/CSV/JSONL files, local or any fsspec URI) is planned into shards
of `shard_size` rows. Each shard is one Ray task that runs img2dataset's `Downloader` on it and
commits the result through the run store: successful rows to `images/<shard>.parquet`, every
other row to `rejected/ingest/<shard>.parquet` with a reason. Shards done with the same config
are skipped on rerun, so a killed run resumes where it stopped. A small run without a cluster
runs the same shard function in the driver process instead, shard by shard, where Ray's start-up
would not be repaid (`_stays_local`).

    pipeline/ingest.py          this file: the driver (`run`), retries, the summary and report
    pipeline/ingest_source.py   list and read the source's files, plan shards, URLs repeated across shards
    pipeline/ingest_policy.py   what is refused before downloading (addresses, blocklists, captions), and
                                what each download error means (reason, dropped or failed, retryable)
    pipeline/ingest_download.py the settings (IngestConfig) and one shard through img2dataset, committed
                                (the body of a Ray task)

Why Ray tasks around img2dataset's Downloader, and not img2dataset's own ray distributor: the
distributor writes img2dataset's shard layout and resumes by its own `_stats.json` files, while
capfilt needs each shard committed atomically through the run store (manifest, accounting,
rejected rows with reasons, one config hash). Calling the Downloader per shard inside a Ray task
keeps img2dataset's downloading, resizing, hashing and X-Robots-Tag handling as they are and
puts scheduling, resume and accounting in one place; the tasks spread over a Ray cluster the
same way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

import pipeline.ray_env  # noqa: F401  (sets RAY_ENABLE_UV_RUN_RUNTIME_ENV before ray)
from capfilt.environment import names_a_ray_cluster, usable_cpus
from capfilt.errors import CapfiltError, ConfigError
from capfilt.logs import is_quiet
from pipeline.ingest_download import STAGE, IngestConfig, run_shard
from pipeline.ingest_policy import is_retryable, reason_fix
from pipeline.ingest_source import ShardSpec, mark_cross_shard_duplicates, plan_shards
from pipeline.run_store import RunStore, config_hash
from pipeline.summary import StageSummary
from schemas import REJECTED


# -- the driver -----------------------------------------------------------------------------

@dataclass(frozen=True)
class IngestRequest:
    """What one ingest takes besides the run: a URL source downloaded with `config`, or another
    run whose downloads this run takes (`from_run`: nothing is downloaded again)."""

    source: str | None = None
    from_run: str | None = None
    config: IngestConfig = field(default_factory=IngestConfig)
    retry_failed: bool = False  # also download again the rows whose latest attempt failed transiently
    progress: bool = True

    def __post_init__(self):
        if bool(self.source) == bool(self.from_run):
            raise ConfigError("give either --source (download a URL source) or --from-run (reuse a run's downloads)")


@dataclass
class IngestSummary(StageSummary):  # rows: source rows; kept: images downloaded
    run_id: str = ""
    shards: int = 0  # planned (retry shards included); shards_skipped of them were already done
    images_per_s: float = 0.0
    failed_shards: list = field(default_factory=list)

    def problem(self, source: str) -> str | None:
        """What to tell a user whose run kept nothing (an error) or lost most of its rows (a warning)."""
        if self.rows_in == 0:
            return f"{source} has no rows: nothing to download (is it the right file or folder?)"
        if self.kept * 2 >= self.rows_in:
            return None
        lost = self.rows_in - self.kept
        top = sorted({**self.dropped, **self.failed}.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        causes = "; ".join(f"{n} of {self.rows_in} {reason}: {reason_fix(reason)}" for reason, n in top)
        return f"{'nothing' if self.kept == 0 else f'only {self.kept}'} of {self.rows_in} rows kept ({lost} lost): {causes}"

    def line(self) -> str:
        local = (f"; downloaded in this process, not on Ray ({self.executor_reason})"
                 if self.executor == "local" and self.executor_reason else "")
        return (f"ingest {self.run_id}: {self.counts()}; {self.shards} shards ({self.shards_skipped} already "
                f"done, skipped); {self.images_per_s:.1f} images/s{local}")


def _retry_specs(store: RunStore, specs: list[ShardSpec]) -> list[ShardSpec]:
    """One retry shard per shard whose latest attempt left rows with retryable errors."""
    final = final_rejected(store)
    by_shard: dict[str, list[str]] = {}
    attempts: dict[str, int] = {}
    for row in final.to_pylist():
        if is_retryable(row["reason"]):
            origin = row["shard"].split(".retry", 1)[0]
            by_shard.setdefault(origin, []).append(row["sample_id"])
            attempts[origin] = max(attempts.get(origin, 1), row["attempt"] or 1)
    out = []
    for spec in specs:
        if spec.shard in by_shard:
            attempt = attempts[spec.shard] + 1
            out.append(ShardSpec(f"{spec.shard}.retry{attempt}", spec.file, spec.start, spec.stop,
                                 attempt=attempt, rows=tuple(sorted(by_shard[spec.shard]))))
    return out


def final_rejected(store: RunStore) -> pa.Table:
    """Rejected ingest rows whose row was not retried later (a row's latest attempt decides)."""
    rejected = store.read_rejected(STAGE)
    if rejected.num_rows == 0:
        return rejected
    rows = rejected.to_pylist()
    latest: dict[str, int] = {}
    for r in rows:
        latest[r["sample_id"]] = max(latest.get(r["sample_id"], 0), r["attempt"] or 1)
    kept_later = set()
    for shard in store.shards("images"):
        if ".retry" in shard:
            kept_later.update(store.read_shard("images", shard).column("sample_id").to_pylist())
    return REJECTED.from_pylist([
        r for r in rows if (r["attempt"] or 1) == latest[r["sample_id"]] and r["sample_id"] not in kept_later
    ])


def run(store: RunStore, request: IngestRequest) -> IngestSummary:
    """Ingest into a run: a source's pending shards downloaded as Ray tasks, or another run's
    downloads taken (`request.from_run`); report/ingest_stats.json written."""
    if request.from_run:
        return reuse(store, request.from_run)
    return download(store, request.source, request.config, request.retry_failed, request.progress)


def download(store: RunStore, source: str, config: IngestConfig, retry_failed: bool = False,
             progress: bool = True) -> IngestSummary:
    """Ingest a source into a run: plan shards, download the pending ones (as Ray tasks, or here
    for a small run without a cluster), report."""
    from tqdm import tqdm

    from pipeline.ray_env import ensure_ray

    root, run_id = store.root, store.run_id
    specs = plan_shards(source, config.shard_size, config.columns)
    if not specs and not store.records(STAGE):  # refused before the run folder exists
        raise CapfiltError(f"ingest {run_id}: {IngestSummary(run_id=run_id).problem(source)}")
    cfg_hash = config_hash(config)
    if retry_failed:
        specs_to_run = [s for s in _retry_specs(store, specs) if not store.is_done(STAGE, s.shard, cfg_hash)]
        all_specs = specs + specs_to_run
    else:
        specs_to_run = [s for s in specs if not store.is_done(STAGE, s.shard, cfg_hash)]
        if specs_to_run:  # the source's URLs are read only when there is something to download
            marked = {s.shard: s for s in mark_cross_shard_duplicates(specs, config.columns)}
            specs_to_run = [marked[s.shard] for s in specs_to_run]
        all_specs = specs
    summary = IngestSummary(run_id=run_id, shards=len(all_specs), shards_skipped=len(all_specs) - len(specs_to_run))
    started = time.time()
    # disable=None: no bar when stderr is not a terminal (a log file gets the summary line)
    bar = tqdm(total=len(specs_to_run), desc=f"ingest {run_id}", unit="shard",
               disable=None if progress and not is_quiet() else True)
    kept_now = 0

    def finished(spec: ShardSpec, kept: int | None, error: BaseException | None) -> None:
        nonlocal kept_now
        if error is not None:
            summary.failed_shards.append(f"{spec.shard}: {type(error).__name__}: {error}")
        kept_now += kept or 0
        bar.update(1)
        bar.set_postfix(images=kept_now, per_s=f"{kept_now / max(time.time() - started, 1e-9):.1f}")

    def here(spec: ShardSpec) -> float:
        """Download and commit one shard in this process; its seconds."""
        began = time.time()
        try:
            finished(spec, run_shard(root, run_id, spec, config, cfg_hash)["kept"], None)
        except Exception as exc:  # noqa: BLE001 - recorded as the shard's failure, as a Ray task's is
            finished(spec, None, exc)
        return time.time() - began

    remaining = list(specs_to_run)
    if remaining and _may_stay_here():
        # The first shard is downloaded here, timed, and the rest go to Ray only when its start-up
        # would be repaid (`_stays_local`). OpenCV's own pixel cap, which a Ray task gets in its
        # environment (the resizer checks --max-pixels before decoding either way), is set here
        # unless the user set it.
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(config.max_pixels))
        summary.executor = "local"
        summary.executor_reason = _stays_local(here(remaining.pop(0)), len(remaining)) or ""
        if summary.executor_reason:
            for spec in remaining:
                here(spec)
            remaining = []
    if remaining:
        import ray

        summary.executor = "ray"
        ensure_ray()
        if len(remaining) == len(specs_to_run):
            started = time.time()  # images/s measures downloading, not Ray's start-up
        task = ray.remote(run_shard).options(
            num_cpus=1,
            # Retried only on system failures (a node or worker lost): a shard commit is atomic
            # and idempotent, so redoing it elsewhere is safe. Errors in the shard itself are
            # not retried here; they are reported and the rerun redoes the shard.
            max_retries=3,
            runtime_env={"env_vars": {"OPENCV_IO_MAX_IMAGE_PIXELS": str(config.max_pixels)}},
        )
        pending = {task.remote(root, run_id, spec, config, cfg_hash): spec for spec in remaining}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            try:
                finished(spec, ray.get(done[0])["kept"], None)
            except ray.exceptions.RayTaskError as exc:
                finished(spec, None, exc.cause if isinstance(exc.cause, Exception) else exc)
    bar.close()
    summary.seconds = time.time() - started
    _summarize(store, summary, [s.shard for s in all_specs])
    summary.images_per_s = (
        sum(r.kept or 0 for r in store.records(STAGE) if r.shard in {s.shard for s in specs_to_run})
        / max(summary.seconds, 1e-9)
        if specs_to_run else 0.0
    )
    write_report(store, summary)
    if summary.failed_shards:
        raise CapfiltError(
            f"ingest {run_id}: {len(summary.failed_shards)} shard(s) failed: "
            + "; ".join(summary.failed_shards[:3])
            + ". Fix the cause and rerun the same command: finished shards are skipped."
        )
    return summary


def _may_stay_here() -> bool:
    """Whether the downloads may stay in this process: no cluster named (RAY_ADDRESS) and no Ray
    this process already started (a flow's earlier step: its start-up is paid, its tasks are free)."""
    import ray

    return not names_a_ray_cluster() and not ray.is_initialized()


def _stays_local(shard_s: float, left: int) -> str | None:
    """After one shard of `shard_s` seconds in this process: why the `left` others stay here, or
    None when Ray would finish them sooner, its start-up included (each of a local Ray's CPUs
    downloads a shard at once; this process downloads one after another)."""
    from pipeline.model_stage import RAY_INIT_S

    in_process, on_ray = shard_s * left, RAY_INIT_S + shard_s * -(-left // usable_cpus())
    if in_process > on_ray:
        return None
    return f"{left + 1} shard(s) of about {shard_s:.0f} s; Ray's start-up of about {RAY_INIT_S:.0f} s would not be repaid"


def reuse(store: RunStore, from_run: str) -> IngestSummary:
    """Ingest by reusing another run's downloads: nothing is downloaded twice.

    A bootstrap round k >= 1 curates round 0's images again; every finished ingest shard of
    `from_run` (its images, its rejected rows and their counts) becomes this run's own, linked
    rather than copied on a local disk. Rerunning skips shards already taken with the same
    source shard; a shard `from_run` redid since is taken again.
    """
    root, run_id = store.root, store.run_id
    source = RunStore(root, from_run)
    done = [r for r in source.records(STAGE) if r.status == "done"]
    if not done:
        raise ConfigError(f"--from-run {from_run}: run '{from_run}' under {root} has no finished ingest shards; "
                          f"ingest it first (capfilt ingest --source ... --run {from_run}).")
    unfinished = [r.shard for r in source.records(STAGE) if r.status != "done"]
    if unfinished:
        raise ConfigError(f"--from-run {from_run}: ingest shard(s) {', '.join(unfinished[:3])} of run '{from_run}' "
                          "did not finish; rerun its ingest first so every source row is accounted for.")
    started = time.time()
    summary = IngestSummary(run_id=run_id, shards=len(done))
    for record in done:
        cfg_hash = config_hash({"from_run": from_run, "shard_config": record.config_hash})
        if store.is_done(STAGE, record.shard, cfg_hash):
            summary.shards_skipped += 1
            continue
        store.adopt_shard(source, STAGE, record.shard, ("images",), cfg_hash, extra={"images_from": from_run})
    summary.seconds = time.time() - started
    _summarize(store, summary, [r.shard for r in done])
    write_report(store, summary)
    return summary


def _summarize(store: RunStore, summary: IngestSummary, shards: list[str]) -> None:
    """Totals over the run's final outcomes (a retried row counts once, by its latest attempt)."""
    records = {r.shard: r for r in store.records(STAGE)}
    originals = [s for s in shards if ".retry" not in s]
    summary.rows_in = sum(records[s].rows_in or 0 for s in originals if s in records)
    summary.kept = sum(records[s].kept or 0 for s in shards if s in records)
    summary.shards_done = len(shards) - summary.shards_skipped
    final = final_rejected(store)
    summary.dropped, summary.failed = {}, {}
    summary.tally(zip(final.column("outcome").to_pylist(), final.column("reason").to_pylist()) if final.num_rows else ())


def write_report(store: RunStore, summary: IngestSummary) -> None:
    """report/ingest_stats.json: per-shard and total stats (success rate, errors, images/s)."""
    per_shard = []
    for record in store.records(STAGE):
        stats = (record.extra or {}).get("stats", {})
        per_shard.append({
            "shard": record.shard, "status": record.status, "attempt": record.attempt,
            "rows_in": record.rows_in, "kept": record.kept, "rejected": record.rejected,
            "failed": record.failed, "duration_s": record.duration_s,
            "images_per_s": stats.get("images_per_s"), "reasons": stats.get("reasons", {}),
            "error": record.error,
        })
    total = asdict(summary)
    total["success_rate"] = summary.kept / summary.rows_in if summary.rows_in else 0.0
    path = f"{store.report_dir()}/ingest_stats.json"
    with store.fs.open(path, "w") as handle:
        json.dump({"total": total, "shards": per_shard}, handle, indent=1, sort_keys=True)


__all__ = ["IngestConfig", "IngestRequest", "IngestSummary", "final_rejected", "run"]
