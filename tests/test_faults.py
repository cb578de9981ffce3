"""Faults: a Ray worker SIGKILLed during caption and during score, and `capfilt curate` SIGKILLed
and rerun. Each run completes, every row is accounted for exactly once, and what it writes equals
what one uninterrupted `capfilt curate` of the same source wrote.

The kills are real SIGKILLs from outside, timed by the run store: a worker dies once its stage has
committed a shard and still has shards to do, and Ray's actor table must then show that actor
restarted; the driver dies once `caption` has committed a shard. A kill that came too late (or
never) fails the test instead of passing it vacuously.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from capfilt.cli import cli
from model.captioners import Decoding, save_random_captioner
from pipeline import caption, score
from pipeline.caption import CaptionConfig
from pipeline.run_store import RunStore
from pipeline.score import ScoreConfig
from schemas import CAPTIONS, CURATED, IMAGES, SCORES

SHARD_SIZE = 6  # 29 source rows: 5 shards, enough for a kill to land between the first and the last
SEED = 3
NUM_CAPTIONS = 2
# Real Ray actors, a real subprocess and an uninterrupted reference run: minutes, not seconds.
pytestmark = pytest.mark.slow
# Ray Data fuses the shard reader into the actor's operator: "MapWorker(MapBatches(read_...)->MapBatches(CaptionActor))"
CAPTION_ACTOR = "MapBatches(CaptionActor)"
SCORE_ACTOR = "MapBatches(ScoreActor)"


# -- one uninterrupted curate run: the reference every fault must end equal to ------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small served world: 24 images, 2 duplicates, 3 bad URLs (404, truncated, not an image)."""
    from model.toy.server import WorldServer
    from model.toy.world import WorldConfig, make_world

    directory = tmp_path_factory.mktemp("fault-world")
    world = make_world(directory, WorldConfig(images=24, seed=SEED, duplicates=2, annotated=0,
                                              bad_url_kinds=("http_404", "truncated_jpeg", "not_image")))
    with WorldServer(directory):
        yield world


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from model.scorers import save_random_clip, save_random_itm

    folder = tmp_path_factory.mktemp("fault-models")
    config, name, checkpoint = save_random_clip(str(folder / "clip"))
    return {"captioner": save_random_captioner(str(folder / "captioner"), "blip"), "clip": name,
            "clip_pretrained": checkpoint, "clip_config": config, "itm": save_random_itm(str(folder / "itm"))}


def curate_argv(world, models, root: str, run: str) -> list[str]:
    # --timeout 10: no download of the local server times out on a loaded machine, so the source's
    # outcome is the same in every run. Exact dedup only: a random tiny CLIP calls most images
    # near-duplicates, which would leave almost nothing curated to compare.
    return ["curate", "--source", world["source"], "--root", root, "--run", run, "--shard-size", str(SHARD_SIZE),
            "--allow-private-addresses", "--image-size", "64", "--timeout", "10",
            "--captioner", models["captioner"], "--num-captions", str(NUM_CAPTIONS), "--seed", str(SEED),
            "--clip", models["clip"], "--clip-pretrained", models["clip_pretrained"], "--clip-config", models["clip_config"],
            "--itm", models["itm"], "--policy", "blip2", "--top-k", "1", "--no-semantic-dedup"]


# The kill needs Ray actors, so the stages below run on Ray ("ray"); `capfilt curate` ran the
# reference's small shards in its driver process (pipeline/model_stage.py, "auto"), so the
# equalities below also hold across the two executors.
def caption_config(models) -> CaptionConfig:
    """What `capfilt curate --captioner C --num-captions 2 --seed 3` captions with (batch size 16)."""
    return CaptionConfig(captioner=models["captioner"], decoding=Decoding(num_captions=NUM_CAPTIONS, seed=SEED),
                         executor="ray")


def score_config(models) -> ScoreConfig:
    """What `capfilt curate --clip ... --itm ...` scores with (batch size 64)."""
    return ScoreConfig(clip=models["clip"], clip_pretrained=models["clip_pretrained"], clip_config=models["clip_config"],
                       itm=models["itm"], executor="ray")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, world, models, ray_local):
    root = str(tmp_path_factory.mktemp("fault-root"))
    cli.main(args=curate_argv(world, models, root, "straight"), prog_name="capfilt", standalone_mode=False)
    store = RunStore(root, "straight")
    assert_every_source_row_accounted_once(store, world["rows"])
    return store


# -- accounting ----------------------------------------------------------------------------------------
def assert_partition(whole: list, *parts: list) -> None:
    """Every item of `whole` is in exactly one of `parts`, and nothing else is."""
    joined = [x for part in parts for x in part]
    assert len(joined) == len(set(joined)), "an item ended up twice"
    assert sorted(joined) == sorted(whole)


def assert_stage_done_and_adds_up(store: RunStore, stage: str, shards: int) -> None:
    records = store.records(stage)
    assert len(records) == shards
    for record in records:
        assert record.status == "done", record
        assert record.rows_in == record.kept + record.rejected + record.failed, record


def column(table, name: str) -> list:
    return table.column(name).to_pylist()


def assert_every_source_row_accounted_once(store: RunStore, source_rows: int) -> None:
    """Source row -> image or rejected; image -> captions or rejected; caption -> score or
    rejected; score -> curated or rejected: each exactly once, and every shard's counts add up."""
    images = store.read("images", IMAGES)
    ingested = column(images, "sample_id") + column(store.read_rejected("ingest"), "sample_id")
    assert len(ingested) == len(set(ingested)) == source_rows
    captions = store.read("captions", CAPTIONS)
    web = captions.filter(captions.column("caption_source").to_numpy(zero_copy_only=False) == "web")
    assert_partition(column(images, "sample_id"), column(web, "sample_id"), column(store.read_rejected("caption"), "sample_id"))
    scores = store.read("scores", SCORES)
    assert_partition(column(captions, "caption_id"), column(scores, "caption_id"), column(store.read_rejected("score"), "caption_id"))
    assert_partition(column(scores, "caption_id"), column(store.read("curated", CURATED), "caption_id"),
                     column(store.read_rejected("select"), "caption_id"))
    shards = len(store.shards("images"))
    for stage in ("ingest", "caption", "score", "select"):
        assert_stage_done_and_adds_up(store, stage, shards)


# -- killing one actor of a running stage ------------------------------------------------------------
def actor_table(class_name: str) -> dict[str, dict]:
    """Ray's actor table for the actors whose class name contains `class_name`, read from the GCS
    (Ray's state API needs the dashboard, which capfilt does not start)."""
    import ray._private.state

    return {aid: a for aid, a in ray._private.state.actors().items() if class_name in a["ActorClassName"]}


class ActorKiller(threading.Thread):
    """SIGKILLs the stage's actor once the stage has committed its first shard (so the kill lands
    mid-run, with shards still to do), and remembers whom it killed and what was done by then."""

    def __init__(self, store: RunStore, stage: str, class_name: str):
        super().__init__(daemon=True, name=f"kill-{stage}-actor")
        self.store, self.stage, self.class_name = RunStore(store.root, store.run_id), stage, class_name
        self.before = set(actor_table(class_name))  # actors of earlier runs in this Ray session
        self.victim: tuple[str, int] | None = None
        self.done_at_kill: set[str] = set()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                done = {r.shard for r in self.store.records(self.stage) if r.status == "done"}
                alive = [(aid, a["Pid"]) for aid, a in actor_table(self.class_name).items()
                         if aid not in self.before and a["State"] == "ALIVE"]
                if done and alive:
                    self.done_at_kill = done
                    self.victim = alive[0]
                    os.kill(self.victim[1], signal.SIGKILL)
                    return
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            self.error = exc


def run_with_actor_killed(stage_run, store: RunStore, stage: str, class_name: str, shards: int):
    killer = ActorKiller(store, stage, class_name)
    killer.start()
    try:
        summary = stage_run()
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert killer.victim is not None, f"no {class_name} was killed: the stage finished first"
    assert 0 < len(killer.done_at_kill) < shards, f"the kill must land mid-run (done then: {sorted(killer.done_at_kill)})"
    actor_id, pid = killer.victim
    # Ray brought the same actor back in a new process (max_restarts) and re-ran its lost batch.
    after = actor_table(class_name)[actor_id]
    assert after["NumRestarts"] >= 1 and after["Pid"] != pid, after
    print(f"{stage}: SIGKILLed {class_name} pid {pid} with {len(killer.done_at_kill)}/{shards} shards done; "
          f"Ray restarted it as pid {after['Pid']}")
    return summary


def copy_of(straight: RunStore, run: str, stages: dict[str, tuple[str, ...]]) -> RunStore:
    """A new run of the same root holding the straight run's finished shards of `stages`."""
    store = RunStore(straight.root, run)
    for stage, artifacts in stages.items():
        for record in straight.records(stage):
            store.adopt_shard(straight, stage, record.shard, artifacts, record.config_hash)
    return store


def test_a_caption_actor_killed_mid_run_is_restarted_and_the_captions_equal_an_uninterrupted_run(straight, models):
    store = copy_of(straight, "caption-actor-killed", {"ingest": ("images",)})
    shards = len(store.shards("images"))
    # The default batch size (16 images) is larger than a shard: shards must still go one per
    # actor task and commit one by one, or the kill cannot land between them.
    cfg = caption_config(models)

    summary = run_with_actor_killed(lambda: caption.run(store, cfg), store, "caption", CAPTION_ACTOR, shards)

    assert summary.shards_done == shards and summary.rows_in == summary.kept + summary.rows_failed
    assert_stage_done_and_adds_up(store, "caption", shards)
    captions = store.read("captions", CAPTIONS)
    web = captions.filter(captions.column("caption_source").to_numpy(zero_copy_only=False) == "web")
    assert_partition(column(store.read("images", IMAGES), "sample_id"), column(web, "sample_id"),
                     column(store.read_rejected("caption"), "sample_id"))
    assert captions.equals(straight.read("captions", CAPTIONS))
    assert store.read_rejected("caption").equals(straight.read_rejected("caption"))
    assert [(r.rows_in, r.kept, r.failed, r.rows_out) for r in store.records("caption")] == \
        [(r.rows_in, r.kept, r.failed, r.rows_out) for r in straight.records("caption")]


def test_a_score_actor_killed_mid_run_is_restarted_and_the_scores_equal_an_uninterrupted_run(straight, models):
    store = copy_of(straight, "score-actor-killed", {"ingest": ("images",), "caption": ("captions",)})
    shards = len(store.shards("captions"))

    summary = run_with_actor_killed(lambda: score.run(store, score_config(models)), store, "score", SCORE_ACTOR, shards)

    assert summary.shards_done == shards and summary.rows_in == summary.kept + summary.rows_failed
    assert_stage_done_and_adds_up(store, "score", shards)
    scores = store.read("scores", SCORES)
    assert_partition(column(store.read("captions", CAPTIONS), "caption_id"), column(scores, "caption_id"),
                     column(store.read_rejected("score"), "caption_id"))
    # Bit for bit, no tolerance: a pair's batch is set by its shard, so the retried shard is
    # scored in the same batches as in the uninterrupted run.
    assert scores.equals(straight.read("scores", SCORES))
    assert store.read_rejected("score").equals(straight.read_rejected("score"))


# -- killing the driver ----------------------------------------------------------------------------
def comparable(table) -> list[dict]:
    """Rows by caption_id (or sample_id), without what names the run: run_id, provenance's run_id."""
    rows = table.to_pylist()
    for row in rows:
        row.pop("run_id", None)
        if row.get("provenance"):
            provenance = json.loads(row["provenance"])
            provenance.pop("run_id", None)
            row["provenance"] = provenance
    return sorted(rows, key=lambda r: r.get("caption_id") or r["sample_id"])


def test_curate_sigkilled_during_caption_and_rerun_equals_an_uninterrupted_run(straight, world, models, tmp_path):
    store = RunStore(straight.root, "driver-killed")
    argv = curate_argv(world, models, straight.root, "driver-killed")
    log = tmp_path / "killed.log"
    # Its own session: SIGKILL to the group takes the driver and the local Ray it started.
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "capfilt.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                   env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any(r.status == "done" for r in store.records("caption")):
            assert process.poll() is None, f"capfilt curate ended before captioning a shard:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no caption shard committed within 240 s"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    shards = len(store.shards("images"))
    done = {(r.stage, r.shard): r.finished_at for r in store.records() if r.status == "done"}
    captioned = sum(stage == "caption" for stage, _ in done)
    assert 0 < captioned < shards, f"the kill must land mid-caption ({captioned}/{shards} shards captioned)"
    assert not store.records("score"), "the kill came after captioning"
    print(f"curate SIGKILLed with {captioned}/{shards} shards captioned")

    cli.main(args=argv, prog_name="capfilt", standalone_mode=False)  # the same command again

    # Shards finished before the kill were skipped, not redone; the rest were done once.
    for (stage, shard), finished_at in done.items():
        assert store.record(stage, shard).finished_at == finished_at, f"{stage} shard {shard} was redone"
    assert_every_source_row_accounted_once(store, world["rows"])
    for stage in ("ingest", "caption", "score", "select"):
        assert [(r.shard, r.rows_in, r.kept, r.rejected, r.failed, r.rows_out) for r in store.records(stage)] == \
            [(r.shard, r.rows_in, r.kept, r.rejected, r.failed, r.rows_out) for r in straight.records(stage)], stage
    # Row for row, in the same order: each stage writes a shard in its source order, whichever
    # download or batch finished first, so the scores' float bits cannot differ either.
    for artifact, schema in (("images", IMAGES), ("captions", CAPTIONS), ("scores", SCORES)):
        assert store.read(artifact, schema).equals(straight.read(artifact, schema)), artifact
    curated = comparable(store.read("curated", CURATED))
    assert curated and curated == comparable(straight.read("curated", CURATED))
    assert comparable(store.read("curated_images")) == comparable(straight.read("curated_images"))
    for stage in ("ingest", "caption", "score", "select"):
        assert comparable(store.read_rejected(stage)) == comparable(straight.read_rejected(stage)), stage
