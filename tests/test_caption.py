"""The caption stage: N synthetic captions per image from tiny BLIP / BLIP-2 models, on Ray actors
(or, for a small local run, in the driver process: the same rows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest
from caption_helpers import commit_image_shards, image_rows

from capfilt.cli import main as cli_main
from capfilt.errors import ConfigError
from model.captioners import Decoding, caption_seed, load_captioner, save_random_captioner
from pipeline import caption as caption_stage
from pipeline.caption import CaptionConfig, assemble_shard, caption_batch, degenerate_reason
from pipeline.run_store import RunStore
from schemas import CAPTIONS, REJECTED

DECODING = Decoding(num_captions=3, max_length=10, min_length=2, seed=11)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny BLIP and a tiny BLIP-2, saved with save_pretrained like hub checkpoints."""
    base = tmp_path_factory.mktemp("captioners")
    return {family: save_random_captioner(str(base / family), family) for family in ("blip", "blip-2")}


@pytest.fixture(scope="module")
def tiny_blip(tiny_folders):
    return load_captioner(tiny_folders["blip"], device="cpu")


def batch_of(rows):
    return pa.Table.from_pylist([{"sample_id": r["sample_id"], "image": r["image"]} for r in rows])


# -- degenerate captions --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "caption, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        (None, "empty"),
        ("... !?", "punctuation_only"),
        ("dog dog dog", "repeated_token"),
        ("Red, red. RED!", "repeated_token"),
        ("a red red red red circle", "repeated_token"),
        ("a small red circle on the left", None),
        ("red red circle", None),
        ("dog", None),
    ],
)
def test_degenerate_captions_are_flagged_with_their_reason(caption, reason):
    assert degenerate_reason(caption) == reason


# -- captioners -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_a_saved_tiny_captioner_loads_by_folder_and_gives_n_captions_per_image(tiny_folders, family):
    captioner = load_captioner(tiny_folders[family], device="cpu")
    rows = image_rows("s", 3)
    decoding = Decoding(num_captions=4, max_length=8, min_length=2, prompt="a photo of", seed=1)
    result = caption_batch(batch_of(rows), captioner, decoding).to_pylist()

    assert [r["sample_id"] for r in result] == ["s/0", "s/1", "s/2"]
    assert all(r["error"] is None and len(r["captions"]) == 4 for r in result)
    assert all(isinstance(c, str) for r in result for c in r["captions"])
    assert result[1]["seeds"] == [caption_seed(1, "s/1", j) for j in range(4)]


def test_beam_search_returns_the_n_best_beams(tiny_blip):
    result = caption_batch(batch_of(image_rows("s", 2)), tiny_blip, Decoding(num_captions=2, num_beams=3, max_length=6))
    assert [len(r["captions"]) for r in result.to_pylist()] == [2, 2]


def test_captions_depend_on_image_and_seed_not_on_batching(tiny_blip):
    rows = image_rows("s", 5)
    together = caption_batch(batch_of(rows), tiny_blip, DECODING).column("captions").to_pylist()
    one_by_one = [caption_batch(batch_of([r]), tiny_blip, DECODING).column("captions")[0].as_py() for r in rows]
    reversed_batch = caption_batch(batch_of(rows[::-1]), tiny_blip, DECODING).column("captions").to_pylist()[::-1]
    assert together == one_by_one == reversed_batch

    other_seed = Decoding(num_captions=3, max_length=10, min_length=2, seed=12)
    assert caption_batch(batch_of(rows), tiny_blip, other_seed).column("captions").to_pylist() != together
    # the N captions of one image are N different draws
    assert any(len(set(captions)) > 1 for captions in together)


def test_an_undecodable_image_fails_alone_and_the_rest_of_the_batch_is_captioned(tiny_blip):
    rows = image_rows("s", 3, corrupt=(1,))
    result = caption_batch(batch_of(rows), tiny_blip, DECODING).to_pylist()
    assert result[1]["captions"] is None and "truncated" in result[1]["error"].lower()
    assert result[0]["error"] is None and len(result[2]["captions"]) == 3


def test_assembled_shard_has_one_web_and_n_synthetic_rows_per_image_and_adds_up(tiny_blip):
    rows = image_rows("s", 4, corrupt=(2,))
    results = caption_batch(batch_of(rows[::-1]), tiny_blip, DECODING)  # any arrival order
    images = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "url", "caption")} for r in rows])
    captions, rejected, counts = assemble_shard("s", images, results, "tiny", DECODING)

    assert (counts.rows_in, counts.kept, counts.failed, counts.rows_out) == (4, 3, 1, 3 * 4)
    assert captions.column("caption_id").to_pylist()[:5] == ["s/0#web", "s/0#syn1", "s/0#syn2", "s/0#syn3", "s/1#web"]
    web = captions.filter(pa.compute.equal(captions.column("caption_source"), "web")).to_pylist()
    assert [r["caption"] for r in web] == [rows[i]["caption"] for i in (0, 1, 3)]
    synthetic = captions.filter(pa.compute.equal(captions.column("caption_source"), "synthetic")).to_pylist()
    assert {r["captioner"] for r in synthetic} == {"tiny"}
    assert json.loads(synthetic[0]["decoding"])["top_p"] == 0.9
    assert (rejected.num_rows, rejected.column("reason")[0].as_py()) == (1, "undecodable_image")
    assert "s/2" in rejected.column("error_message")[0].as_py()
    CAPTIONS.validate(captions)
    REJECTED.validate(rejected)


def test_bad_decoding_values_are_config_errors():
    with pytest.raises(ConfigError, match="--num-captions"):
        Decoding(num_captions=0)
    with pytest.raises(ConfigError, match="--top-p"):
        Decoding(top_p=1.5)
    with pytest.raises(ConfigError, match="--num-beams"):
        Decoding(num_captions=4, num_beams=2)


# -- the stage on Ray --------------------------------------------------------------------------------
def test_stage_captions_every_ingested_shard_accounts_for_every_image_and_rerun_does_no_work(
    tmp_path, ray_local, tiny_folders
):
    store = RunStore(str(tmp_path), "r")
    commit_image_shards(store, {"a": 5, "b": 4, "empty": 0}, corrupt={"b": (0,)})
    # executor "ray": a run this small would otherwise go to the driver process (next test)
    cfg = CaptionConfig(captioner=tiny_folders["blip-2"], decoding=DECODING, batch_size=3, executor="ray")

    summary = caption_stage.run(store, cfg)

    assert summary.executor == "ray" and "driver process" not in summary.line()
    assert (summary.shards_done, summary.rows_in, summary.kept, summary.failed) == (3, 9, 8, {"undecodable_image": 1})
    assert summary.web_captions == 8 and summary.synthetic_captions == 8 * 3
    captions = store.read("captions", CAPTIONS)
    assert captions.num_rows == 8 * (1 + 3)
    assert len(set(captions.column("caption_id").to_pylist())) == captions.num_rows
    for record in store.records("caption"):
        assert record.status == "done"
        assert record.rows_in == record.kept + record.failed
    record_b = store.record("caption", "b")
    assert (record_b.rows_in, record_b.kept, record_b.failed, record_b.rows_out) == (4, 3, 1, 12)
    rejected = store.read_rejected("caption").to_pylist()
    assert [(r["sample_id"], r["outcome"], r["reason"]) for r in rejected] == [("b/0", "failed", "undecodable_image")]

    # another batch size or pool does not change what is written: nothing to redo
    again = caption_stage.run(store, CaptionConfig(captioner=cfg.captioner, decoding=DECODING, batch_size=2, actors=1))
    assert (again.shards_done, again.shards_skipped) == (0, 3)
    assert store.read("captions", CAPTIONS).equals(captions)


def test_a_small_local_run_captions_in_the_driver_process_says_so_and_writes_what_ray_actors_write(
    tmp_path, capsys, monkeypatch, ray_local, tiny_folders
):
    import pipeline.model_stage as model_stage

    # through the CLI: `--executor ray`, the default (auto) and `--executor local`; "auto-large": the
    # default where Ray would start in no time, so its timed first batches send the run to Ray
    runs = {executor: RunStore(str(tmp_path / executor), "r") for executor in ("ray", "auto", "local", "auto-large")}
    lines = {}
    for executor, store in runs.items():
        commit_image_shards(store, {"a": 5, "b": 4}, corrupt={"b": (0,)})
        chosen = ["--executor", executor] if executor in ("ray", "local") else []
        if executor == "auto-large":
            monkeypatch.setattr(model_stage, "ray_startup_s", lambda model_load_s: 0.0)
        cli_main(["caption", "--root", str(tmp_path / executor), "--run", "r", "--captioner", tiny_folders["blip"],
                  "--num-captions", "3", "--max-new-tokens", "10", "--min-new-tokens", "2", "--seed", "11",
                  "--batch-size", "3", *chosen])
        lines[executor] = capsys.readouterr().out.strip()

    assert "driver process" not in lines["ray"] and "9 images = 8 captioned + 0 dropped + 1 failed" in lines["ray"]
    # 4 batches of a tiny model: far below what Ray's start-up would be worth
    assert "ran in the driver process, not on Ray actors (small run: 4 batch(es)" in lines["auto"]
    assert "ran in the driver process, not on Ray actors (executor local)" in lines["local"]
    assert "driver process" not in lines["auto-large"] and "9 images = 8 captioned" in lines["auto-large"]
    for executor in ("auto", "local", "auto-large"):
        assert runs[executor].read("captions", CAPTIONS).equals(runs["ray"].read("captions", CAPTIONS))
        assert runs[executor].read_rejected("caption").equals(runs["ray"].read_rejected("caption"))
        assert [(r.shard, r.rows_in, r.kept, r.failed, r.rows_out) for r in runs[executor].records("caption")] == \
            [(r.shard, r.rows_in, r.kept, r.failed, r.rows_out) for r in runs["ray"].records("caption")]


def test_auto_keeps_a_run_in_the_driver_while_rays_start_up_would_be_over_15_percent_of_it():
    from pipeline.model_stage import ray_startup_s, small_run_reason

    # 40 batches of 0.35 s (14 s) against 30 s of start-up: Ray would take 44 s for 14 s of work
    assert small_run_reason(0.35, 40, 30.0) == ("small run: 40 batch(es) x 0.35 s = 14 s; Ray's start-up of about "
                                                "30 s would be more than 15% of it")
    # the crossover: start-up = 15% of start-up + batches, at 170 s of batches for 30 s
    assert small_run_reason(1.0, 169, 30.0) is not None and small_run_reason(1.0, 171, 30.0) is None
    assert small_run_reason(0.01, 10_000, 30.0) is not None  # fast batches (a GPU) stay local longer
    assert ray_startup_s(20.0) == pytest.approx(ray_startup_s(0.0) + 20.0)  # the actor loads the model again


def test_the_cli_refuses_an_unknown_executor_in_one_line(tmp_path, capsys):
    from capfilt.commands.options import EXECUTORS
    from pipeline.model_stage import EXECUTORS as STAGE_EXECUTORS

    assert EXECUTORS == STAGE_EXECUTORS  # the CLI's choices are the driver's
    code, out = run_cli(["caption", "--root", str(tmp_path), "--run", "r", "--captioner", "none", "--executor", "threads"],
                        capsys)
    assert code == 2 and "--executor" in out.err and "'threads' is not one of 'auto', 'ray', 'local'" in out.err


def test_a_bad_executor_is_a_config_error():
    with pytest.raises(ConfigError, match="executor must be one of auto, ray, local"):
        CaptionConfig(captioner="none", executor="threads")


def test_captioner_none_passes_web_captions_through_and_still_fails_undecodable_images(tmp_path):
    store = RunStore(str(tmp_path), "r")
    commit_image_shards(store, {"a": 3, "b": 2}, corrupt={"b": (1,)})

    summary = caption_stage.run(store, CaptionConfig(captioner="none"))

    assert (summary.rows_in, summary.kept, summary.rows_failed, summary.synthetic_captions) == (5, 4, 1, 0)
    captions = store.read("captions", CAPTIONS)
    assert captions.column("caption_source").to_pylist() == ["web"] * 4
    assert [r["reason"] for r in store.read_rejected("caption").to_pylist()] == ["undecodable_image"]
    assert caption_stage.run(store, CaptionConfig(captioner="none")).shards_skipped == 2


def test_stage_skips_image_shards_whose_ingest_is_not_done(tmp_path, ray_local, tiny_folders):
    store = RunStore(str(tmp_path), "r")
    commit_image_shards(store, {"a": 2, "late": 2})
    store.start_shard("ingest", "late", "test-ingest")  # being re-ingested
    summary = caption_stage.run(store, CaptionConfig(captioner=tiny_folders["blip"], decoding=DECODING))
    assert (summary.shards_done, summary.shards_not_ingested) == (1, 1)
    assert store.shards("captions") == ["a"]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rows_as_an_uninterrupted_one(tmp_path, ray_local, tiny_folders):
    shards = {f"s{i}": 6 for i in range(8)}
    decoding = Decoding(num_captions=3, max_length=16, min_length=8, seed=5)
    killed = RunStore(str(tmp_path / "killed"), "r")
    commit_image_shards(killed, shards, corrupt={"s3": (2,)})
    command = [
        sys.executable, "-m", "capfilt.cli", "caption", "--root", killed.root, "--run", "r",
        "--captioner", tiny_folders["blip"], "--num-captions", "3", "--max-new-tokens", "16",
        "--min-new-tokens", "8", "--seed", "5", "--batch-size", "2",
    ]
    # RAY_ADDRESS=local: the killed run starts its own Ray, never joins one found on the machine
    env = {**os.environ, "RAY_ADDRESS": "local"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not any(r.status == "done" for r in killed.records("caption")):
            assert process.poll() is None, "capfilt caption ended before committing a shard"
            assert time.time() < deadline, "no shard committed within 120 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    done_before = {r.shard for r in killed.records("caption") if r.status == "done"}
    assert 0 < len(done_before) < len(shards), "the kill must land between the first and the last shard"

    resumed = caption_stage.run(killed, CaptionConfig(captioner=tiny_folders["blip"], decoding=decoding))
    assert resumed.shards_skipped == len(done_before)
    assert resumed.shards_done == len(shards) - len(done_before)

    straight = RunStore(str(tmp_path / "straight"), "r")
    commit_image_shards(straight, shards, corrupt={"s3": (2,)})
    caption_stage.run(straight, CaptionConfig(captioner=tiny_folders["blip"], decoding=decoding, batch_size=5))
    after_resume = killed.read("captions", CAPTIONS)
    assert after_resume.equals(straight.read("captions", CAPTIONS))
    assert len(set(after_resume.column("caption_id").to_pylist())) == after_resume.num_rows
    assert killed.read_rejected("caption").column("sample_id").to_pylist() == ["s3/2"]


# -- CLI -----------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return exit_info.value.code, capsys.readouterr()


def test_cli_names_an_unknown_captioner_folder_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    code, out = run_cli(["caption", "--root", str(tmp_path), "--run", "r", "--captioner", missing, "--num-captions", "2"], capsys)
    assert code == 2
    assert out.err.count("\n") == 1 and missing in out.err and "save_pretrained" in out.err


def test_cli_rejects_a_bad_num_captions_in_one_line(tmp_path, capsys, tiny_folders):
    code, out = run_cli(
        ["caption", "--root", str(tmp_path), "--run", "r", "--captioner", tiny_folders["blip"], "--num-captions", "0"],
        capsys,
    )
    assert code == 2
    assert out.err.count("\n") == 1 and "--num-captions must be >= 1" in out.err


def test_cli_prints_a_summary_whose_counts_add_up(tmp_path, capsys, ray_local, tiny_folders):
    store = RunStore(str(tmp_path), "demo")
    commit_image_shards(store, {"a": 3}, corrupt={"a": (1,)})
    cli_main(["caption", "--root", str(tmp_path), "--run", "demo", "--captioner", tiny_folders["blip"], "--num-captions", "4"])
    line = capsys.readouterr().out.strip()
    assert "3 images = 2 captioned + 0 dropped + 1 failed (undecodable_image 1)" in line
    assert "10 caption rows = 2 web + 8 synthetic" in line


def test_curate_hands_its_executor_to_the_caption_and_score_stages(tmp_path, monkeypatch):
    import flows.steps
    from capfilt.cli import cli

    source = tmp_path / "source.parquet"
    pa.parquet.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["a red circle"]}), source)
    made = {}

    def make(command, values, *args, **kwargs):
        made[command] = step = real_make(command, values, *args, **kwargs)
        return step

    class Stop(Exception):
        pass

    def stop(self, say=print):
        raise Stop

    real_make = flows.steps.make
    monkeypatch.setattr(flows.steps, "make", make)
    monkeypatch.setattr(flows.steps.step_class("ingest"), "execute", stop)
    with pytest.raises(Stop):
        cli.main(args=["curate", "--source", str(source), "--root", str(tmp_path), "--run", "r", "--captioner", "none",
                       "--clip", "ViT-B-32", "--executor", "local"], prog_name="capfilt", standalone_mode=False)
    assert made["caption"].config.executor == made["filter"].score.executor == "local"
