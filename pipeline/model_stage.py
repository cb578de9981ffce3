"""The driver every model-holding stage shares (caption, score): pending shards in, one commit per shard out.

    pending shards ──► read (shard ids -> rows) ──► map_batches(the stage's actor, actor pool, GPU per
    actor when present) ──► driver groups results by shard ──► the stage's commit(shard, results)

A stage hands `run_model_stage` a `ModelStage`: its reader, its actor class (a `ShardActor`: loads
its model(s) once in `__init__`, runs one batch through the stage's pure batch function in
`batch`) and its commit. Everything else is here, once: the start records, the CPU budget of the
pool, one Ray Data job for all pending shards, a shard committed as soon as all its rows are back
(so a killed run keeps every shard committed before the kill; the run store's records make the
resume), the failure records, and the start-up timing.

Why one dataset over all pending shards (rather than one per shard): the model is loaded once
per actor for the whole run and the actors never idle between shards.

Where the batches run (`executor`): "ray" is the actor pool above, the way every real run goes.
"local" runs the same actor class in the driver process, shard by shard: no Ray, no actor process.
"auto" (the default) sends any cluster, any pool of more than one actor and any machine with more
than one GPU to Ray (`ray_reason`). Otherwise it loads the model in the driver (the check a Ray run
makes there anyway), runs the first shard's first batches and times one: a pool of one actor
computes no faster than the driver, so Ray only pays when its fixed start-up is a small share of
the run (`small_run_reason`). A small run goes on in the driver, keeping the batches it has done,
and the stage's summary line says so; a larger one frees the driver's model and goes to Ray.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from capfilt.environment import names_a_ray_cluster
from capfilt.errors import CapfiltError, ConfigError
from pipeline.run_store import RunStore
from pipeline.summary import StageSummary

EXECUTORS = ("auto", "ray", "local")
# Ray's fixed cost before a run's first batch on Ray, measured on a 2-core machine (benchmarks/caption.py
# and benchmarks/score.py print both): ray.init() of a fresh local Ray 15 s; the Ray Data job and the
# actor's process importing torch, transformers and open_clip 12-21 s (with the benchmarks' models, loaded in
# under a second; a run adds its own model's load, as timed in the driver: `ray_startup_s`).
RAY_INIT_S = 15.0
RAY_ACTOR_START_S = 15.0
# "auto" goes to Ray when that start-up is at most this share of the run: the model stages' target is
# >= 0.85x a bare batched loop end to end, so at the crossover Ray's run is 0.85x the driver's.
RAY_STARTUP_SHARE = 0.15


def check_actor_settings(batch_size: int, actors: int | None, cpus_per_actor: int, executor: str) -> None:
    """The settings every model stage's config has (its batch, its actor pool, where it runs), checked alike."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size}).")
    if actors is not None and actors < 1:
        raise ConfigError(f"--actors must be >= 1 (got {actors}).")
    if cpus_per_actor < 1:
        raise ConfigError(f"--cpus-per-actor must be >= 1 (got {cpus_per_actor}).")
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)} (got {executor!r}).")


class ShardActor:
    """Base of a stage's model-holding callable class: the subclass loads its model(s) in `__init__`
    (after this one's) and runs one batch in `batch`; a call does one shard, `batch_size` rows at a
    time. One shard per call: a row's batch is then set by its shard's rows, not by which shards
    Ray bundled together, so a rerun or a retry after a lost actor writes the same rows."""

    def __init__(self, batch_size: int, torch_threads: int | None = None):
        if torch_threads:
            import torch

            # as many threads as cores reserved: more threads than cores makes torch's OpenMP
            # workers spin against the read tasks and other actors (10x slower on a busy 2-core box)
            torch.set_num_threads(torch_threads)
        self.batch_size = batch_size

    def batch(self, rows: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, shard: pa.Table) -> pa.Table:
        """One shard's rows (with a `shard` column) -> results, each batch's keeping the shard
        column and the time the batch started (for the driver's start-up timing)."""
        parts = []
        for start in range(0, shard.num_rows, self.batch_size):  # the driver sends no empty shard
            rows = shard.slice(start, self.batch_size)
            began = time.time()
            parts.append(self.batch(rows.drop_columns(["shard"])).append_column("shard", rows.column("shard")).append_column(
                "batch_started_at", pa.array([began] * rows.num_rows, pa.float64())))
        return pa.concat_tables(parts)


@dataclass(frozen=True)
class ModelStage:
    """What a model-holding stage tells the driver; the reader and actor must pickle (Ray ships them)."""

    name: str  # the stage, as the run store records it
    output_hash: str
    rows: dict[str, int]  # pending shard -> rows the actors will see (0: committed empty, no work)
    read: Callable[..., pa.Table]  # (table of shard ids, root=, run_id=) -> those shards' rows + `shard`
    actor: type[ShardActor]
    commit: Callable[[str, pa.Table | None], None]  # (shard, its results in any order; None: an empty shard)
    actor_kwargs: dict = field(default_factory=dict)  # besides batch_size and torch_threads
    check: Callable[[], object] | None = None  # driver-side model check before Ray starts (local builds the actor)
    batch_size: int = 16
    actors: int | None = None  # default: one per GPU, else one
    cpus_per_actor: int = 1
    executor: str = "auto"


def batches(rows: dict[str, int], batch_size: int) -> int:
    return sum(-(-n // batch_size) for n in rows.values())


def ray_reason(stage: ModelStage) -> str | None:
    """Why the stage runs on Ray whatever its size, or None when "auto" may keep it in the driver
    process: an explicit executor "ray", a cluster address, a pool of more than one actor, a Ray
    already started on more than one node, or more than one GPU (one actor each, in parallel)."""
    if stage.executor != "auto":
        return "executor ray" if stage.executor == "ray" else None
    if names_a_ray_cluster():
        return "RAY_ADDRESS names a cluster"
    if (stage.actors or 1) > 1:
        return f"{stage.actors} actors"
    ray = sys.modules.get("ray")  # already started (a flow, a test): is it a cluster?
    if ray is not None and ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        return "a Ray cluster of several nodes"
    import torch

    if torch.cuda.device_count() > 1:
        return f"{torch.cuda.device_count()} GPUs"
    return None


def ray_startup_s(model_load_s: float = 0.0) -> float:
    """Ray's start-up before a first batch on Ray: ray.init() unless Ray runs, an actor's start, and
    the actor's model load, `model_load_s` as the driver's took (seconds for a large model; the
    constant's measurement had small ones)."""
    ray = sys.modules.get("ray")
    return RAY_ACTOR_START_S + model_load_s + (0.0 if ray is not None and ray.is_initialized() else RAY_INIT_S)


def small_run_reason(batch_s: float, n_batches: int, startup_s: float) -> str | None:
    """Why a run of `n_batches` batches of `batch_s` seconds each stays in the driver process, or
    None when Ray's start-up `startup_s` would be at most RAY_STARTUP_SHARE of the run on Ray."""
    run_s = batch_s * n_batches
    if startup_s <= RAY_STARTUP_SHARE * (run_s + startup_s):
        return None
    return (f"small run: {n_batches} batch(es) x {batch_s:.2f} s = {run_s:.0f} s; Ray's start-up of about "
            f"{startup_s:.0f} s would be more than {RAY_STARTUP_SHARE:.0%} of it")


def _probe(store: RunStore, stage: ModelStage, shard: str, actor: ShardActor) -> tuple[pa.Table, pa.Table, float]:
    """The first shard's rows, its first one or two batches done, and the seconds of one batch: the
    second when there is one (the first pays first-call allocations), scaled to a full batch."""
    rows = stage.read(pa.table({"shard": [shard]}), root=store.root, run_id=store.run_id)
    done, batch_s = [], 0.0
    for start in range(0, min(rows.num_rows, 2 * stage.batch_size), stage.batch_size):
        part = rows.slice(start, stage.batch_size)
        began = time.perf_counter()
        done.append(actor(part))
        batch_s = (time.perf_counter() - began) * stage.batch_size / part.num_rows
    return rows, pa.concat_tables(done), batch_s


def run_model_stage(store: RunStore, stage: ModelStage, run: StageSummary) -> StageSummary:
    """Run `stage` over its pending shards, committing each through `stage.commit` once all its rows
    are back; the shards are recorded started first, and failed if the run breaks. Fills in and
    returns the driver fields of `run`, the stage's summary (wall time, start-up, executor)."""
    started = time.time()  # wall clock: compared with the batches' start times
    working = [s for s, n in stage.rows.items() if n > 0]
    local_actor, driver_threads, probed = None, None, None
    if working and ray_reason(stage) is None:
        import torch

        driver_threads = torch.get_num_threads()  # put back once the run is done: the driver goes on with its own
        # the compute one actor would reserve; a bad model fails here, in one line, before any shard starts
        try:
            began = time.perf_counter()
            local_actor = stage.actor(**stage.actor_kwargs, batch_size=stage.batch_size,
                                      torch_threads=_torch_threads(stage, torch.cuda.device_count()))
            model_load_s = time.perf_counter() - began
        except BaseException:
            torch.set_num_threads(driver_threads)
            raise
    elif working and stage.check is not None:
        stage.check()  # the same, before Ray starts
    for shard in stage.rows:
        store.start_shard(stage.name, shard, stage.output_hash)
    for shard in [s for s in stage.rows if stage.rows[s] == 0]:
        stage.commit(shard, None)
    if not working:
        return run
    arrived: dict[str, list[pa.Table]] = {s: [] for s in working}
    counts = dict.fromkeys(working, 0)
    try:
        reason = "executor local"
        if local_actor is not None and stage.executor == "auto":
            rows, done, batch_s = _probe(store, stage, working[0], local_actor)
            reason = small_run_reason(batch_s, batches(stage.rows, stage.batch_size), ray_startup_s(model_load_s))
            probed = (rows, done)
            if reason is None:  # large enough for Ray: the probe's batches are redone there, the driver's model freed
                local_actor = probed = None
                _free_driver_model(driver_threads)
                driver_threads = None
        run.executor, run.executor_reason = ("local", reason) if local_actor is not None else ("ray", "")
        results = (_local_results(store, stage, working, local_actor, probed) if local_actor is not None
                   else _ray_results(store, stage, working))
        for batch in results:
            first_batch = pa.compute.min(batch.column("batch_started_at")).as_py() - started
            run.startup_s = min(run.startup_s or first_batch, first_batch)
            shard_of = batch.column("shard").to_pylist()
            for shard in set(shard_of):
                part = batch.filter(pa.array([s == shard for s in shard_of])).drop_columns(["shard", "batch_started_at"])
                arrived[shard].append(part)
                counts[shard] += part.num_rows
                if counts[shard] == stage.rows[shard]:
                    stage.commit(shard, pa.concat_tables(arrived.pop(shard)))
    except Exception as exc:
        for shard in arrived:  # shards committed above are no longer in `arrived`
            store.fail_shard(stage.name, shard, stage.output_hash, f"{type(exc).__name__}: {exc}"[:2000])
        cause: BaseException | None = exc  # Ray wraps an actor's error; surface a user error as one line
        while cause is not None and not isinstance(cause, CapfiltError):
            cause = cause.__cause__
        if cause is not None and cause is not exc:
            raise cause from exc
        raise
    finally:
        if driver_threads is not None:
            import torch

            torch.set_num_threads(driver_threads)
    run.seconds = time.time() - started
    if arrived:
        raise RuntimeError(f"{stage.name}: shards {sorted(arrived)} did not receive all their rows")
    return run


def _torch_threads(stage: ModelStage, gpus: float) -> int | None:
    return None if gpus else stage.cpus_per_actor


def _free_driver_model(driver_threads: int) -> None:
    """After a probe that chose Ray: the driver's torch threads back, its copy of the model freed
    (on a GPU, the actor loads the model there next)."""
    import gc

    import torch

    torch.set_num_threads(driver_threads)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _local_results(store: RunStore, stage: ModelStage, working: list[str], actor: ShardActor,
                   probed: tuple[pa.Table, pa.Table] | None):
    for shard in working:
        if probed is not None and shard == working[0]:  # its first batches are done: the same batches go on
            rows, done = probed
            rest = rows.slice(done.num_rows)
            yield pa.concat_tables([done, actor(rest)]) if rest.num_rows else done
            continue
        yield actor(stage.read(pa.table({"shard": [shard]}), root=store.root, run_id=store.run_id))


def _ray_results(store: RunStore, stage: ModelStage, working: list[str]):
    import pipeline.ray_env as ray_env  # sets the Ray env before ray is imported
    import ray

    ray_env.ensure_ray()
    gpus = ray_env.gpus_available()
    actors = stage.actors or max(1, int(gpus))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if actors * stage.cpus_per_actor > cpus:
        raise ConfigError(
            f"{stage.name}: {actors} actor(s) x {stage.cpus_per_actor} CPU(s) per actor needs more than the "
            f"{cpus} CPU(s) Ray has; lower the actors or the CPUs per actor (capfilt caption: --actors, "
            f"--cpus-per-actor; capfilt filter: --score-actors)."
        )
    # Shards are read inside Ray tasks through the run store (any fsspec root), not with
    # ray.data.read_parquet: that keeps the driver's memory flat and, with ray 2.60 and the locked
    # fsspec, read_parquet fails on an import of fsspec's HTTPFileSystem.
    ds = ray.data.from_items([{"shard": s} for s in working], override_num_blocks=len(working)).map_batches(
        stage.read, fn_kwargs=dict(root=store.root, run_id=store.run_id), batch_size=1, batch_format="pyarrow",
    ).map_batches(
        stage.actor,
        fn_constructor_kwargs=dict(stage.actor_kwargs, batch_size=stage.batch_size,
                                   torch_threads=_torch_threads(stage, gpus)),
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        num_cpus=stage.cpus_per_actor,
        # One shard per call, batched inside the actor (ShardActor). Ray Data fuses the reader into
        # this operator and then bundles `batch_size` of its *input* rows, the shard ids, per task:
        # a batch size of 16 put 16 shards in one task, so the driver could commit none of them
        # before all were done, a killed actor redid all 16, and with fewer tasks than actors some
        # actors idled.
        batch_size=None,
        batch_format="pyarrow",
    )
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
