"""Prefect flows: typed parameters checked before work, embedded runs, Ray jobs on a real head."""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from capfilt.errors import CapfiltError, ConfigError
from flows.jobs import run_job
from flows.params import CurateParams
from flows.steps import make
from pipeline.run_store import RunStore, ShardCounts


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_params_validation():
    with pytest.raises(ValidationError, match="run"):
        CurateParams(source="s", run="../escape")
    with pytest.raises(ValidationError, match="ray_address"):
        CurateParams(source="s", run="r", execution={"mode": "cluster"})
    with pytest.raises(ValidationError, match="extra"):
        CurateParams(source="s", run="r", typo=1)


def test_stage_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="^stage ingest: shard-size='many' is not an integer"):
        make("ingest", {"source": "s", "root": "r", "run": "x", "shard-size": "many"})
    with pytest.raises(ConfigError, match="^stage ingest: unknown field 'bogus'; known fields: .*shard-size"):
        make("ingest", {"source": "s", "root": "r", "run": "x", "bogus": 1})


BASE = {"ingest": {"source": "s", "root": "r", "run": "x"}, "caption": {"root": "r", "run": "x"},
        "filter": {"root": "r", "run": "x", "clip": "ViT-B-32"}, "eval": {"root": "r", "run": "x"},
        "train stage1": {"root": "r", "run": "x", "vision": "v", "out": "o"},
        "train stage2": {"root": "r", "run": "x", "stage1": ".", "llm": "l", "out": "o"}}


@pytest.mark.parametrize("stage, extra, message", [
    ("filter", {"top-k": 0}, "--top-k must be >= 1"),
    ("filter", {"policy": "bogus"}, "--policy 'bogus': choose from"),
    ("filter", {"policy": "blip"}, "--policy blip needs --itm"),
    ("train stage1", {"cache-features": True}, "--cache-features needs --no-augment"),
    ("train stage1", {"model-config": "[1]"}, "--model-config: must be a JSON object"),
    ("train stage2", {"min-lr": 1}, "--min-lr must be in"),
    ("ingest", {"resize-mode": "stretch"}, "--resize-mode 'stretch' is not one of"),
    ("ingest", {"url-blocklist": "/nonexistent/list.txt"}, "blocklist file /nonexistent/list.txt does not exist"),
    ("ingest", {"from-run": "r0"}, "give either --source .* or --from-run"),
    ("caption", {"captioner": "c", "top-p": 0}, "--top-p must be in"),
    ("caption", {"captioner": "c", "num-beams": 2, "num-captions": 4}, "raise --num-beams"),
    ("eval", {"out": "o.json"}, "nothing to evaluate"),
])
def test_every_stage_builds_its_typed_config_before_any_work(stage, extra, message):
    # What the stage itself would refuse hours later (after ingest and captioning) is refused up front.
    with pytest.raises(ConfigError, match=f"^stage {stage}: .*{message}"):
        make(stage, {**BASE[stage], **extra})
    make(stage, {**BASE[stage], **({"captioner": "c"} if stage == "caption" else {}),
                 **({"out": "o.json", "stage1": "."} if stage == "eval" else {})})  # the defaults pass


def test_a_step_travels_to_a_ray_job_as_json_and_comes_back_equal():
    import json

    from flows.jobs import job_entrypoint
    from flows.steps import step_data, step_from_data

    step = make("filter", {**BASE["filter"], "no-semantic-dedup": True, "top-k": 1, "policy": "blip2,clip-threshold",
                           "max-aspect-ratio": float("inf")})
    assert step.dedup.semantic is False and step.select["top_k"] == 1
    assert step.select["policies"] == ("blip2", "clip-threshold")
    assert step_from_data(json.loads(json.dumps(step_data(step)))) == step
    assert job_entrypoint(step).startswith("python -m flows.stage_job '{")


def test_bootstrap_refuses_a_bad_override_before_prefect_or_ray_start(tmp_path):
    # One line, no traceback, and neither Prefect nor Ray were started for it.
    done = subprocess.run([sys.executable, "-m", "capfilt.cli", "bootstrap", "--source", str(tmp_path), "--root",
                           str(tmp_path), "--set", "filter.top-k=0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.strip() == "capfilt: error: stage filter: --top-k must be >= 1 (got 0)."
    done = subprocess.run([sys.executable, "-m", "capfilt.cli", "bootstrap", "--source", str(tmp_path), "--root",
                           str(tmp_path), "--set", "stage1.stepz=5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith("capfilt: error: stage train stage1: unknown field 'stepz' (did you mean 'steps'?); known fields:") and \
        " steps," in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from model.scorers import save_random_clip

    config, name, checkpoint = save_random_clip(str(tmp_path_factory.mktemp("clip")))
    return {"clip": name, "clip_pretrained": checkpoint, "clip_config": config}


def test_curate_flow_embedded_records_counts_as_artifacts(prefect_harness, ray_local, small_world, tiny_scorers, tmp_path):
    from prefect import get_client

    from flows.curate import curate
    from model.captioners import save_random_captioner

    world = small_world["world"]
    captioner = save_random_captioner(str(tmp_path / "captioner"))
    params = CurateParams(
        source=world["source"], root=str(tmp_path), run="flowrun",
        # no retry passes: the world's slow and 500 rows would cost two more timeouts and backoffs
        ingest={"allow-private-addresses": True, "timeout": 2, "image-size": 64, "shard-size": 25, "retries": 0},
        caption={"captioner": captioner, "num-captions": 2},
        filter={"clip": tiny_scorers["clip"], "clip-config": tiny_scorers["clip_config"],
                "clip-pretrained": tiny_scorers["clip_pretrained"], "policy": "blip2", "top-k": 1},
    )
    totals = curate(params)
    ingest = next(t for t in totals if t["stage"] == "ingest")
    assert ingest["rows_in"] == world["rows"] == ingest["kept"] + ingest["rejected"] + ingest["failed"]
    shards = -(-world["rows"] // 25)
    assert ingest["done"] == ingest["shards"] == shards
    caption = next(t for t in totals if t["stage"] == "caption")
    assert caption["rows_in"] == ingest["kept"] and caption["rows_out"] == 3 * caption["kept"]
    select = next(t for t in totals if t["stage"] == "select")
    assert select["rows_in"] == caption["rows_out"] and select["kept"] + select["rejected"] == select["rows_in"]

    async def artifacts():
        # Plain API call: prefect 3.8's read_artifacts() sends filters this server rejects or misreads.
        async with get_client() as client:
            response = await client.request("POST", "/artifacts/filter", json={"limit": 200, "offset": 0, "sort": "CREATED_DESC"})
            return response.json()

    import asyncio

    found = asyncio.run(artifacts())
    kinds = {a["type"] for a in found}
    assert {"table", "markdown", "progress"} <= kinds
    markdowns = [a["data"] for a in found if a["type"] == "markdown"]
    assert any(f"| ingest | {shards}/{shards} | {world['rows']} |" in m for m in markdowns)
    assert any("/runs/flowrun/report" in m for m in markdowns)  # the link to the report (a markdown link)
    # Bad stage options fail the flow before any stage runs.
    with pytest.raises(ConfigError):
        curate(CurateParams(source=world["source"], root=str(tmp_path), run="never", ingest={"shard-size": "x"}))
    assert RunStore(str(tmp_path), "never").records() == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_jobs_accepted(address, timeout=120):
    """The head's job agent starts a little after `ray start` returns; wait until it takes a job."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            client = JobSubmissionClient(address)
            sid = client.submit_job(entrypoint="true")
            break
        except (RuntimeError, ConnectionError) as exc:
            if time.time() > deadline:
                raise AssertionError(f"Ray head never accepted a job: {exc}")
            time.sleep(1)
    while client.get_job_status(sid).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head started with `ray start --head` on 127.0.0.1 (job submission on)."""
    port, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # `--block` keeps the head in this process group, so teardown stops exactly this head:
    # `ray stop` would kill every Ray on the machine, the in-process Ray of other tests too.
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--disable-usage-stats", "--include-dashboard=true",
         # Own ports for every agent, so this head never collides with the in-process Ray of
         # other tests (which uses the defaults).
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        _wait_until_jobs_accepted(f"http://127.0.0.1:{dashboard}")
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "bin": ray_bin, "gcs": f"127.0.0.1:{port}"}
    finally:
        # SIGKILL, not SIGTERM: the head's graceful stop took 38 s on 2 cores (the old 20 s wait
        # then killed it anyway), and a throwaway head has nothing to flush. Every process it
        # started is in its group, so none is left behind.
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=60)
        os.environ.pop("RAY_AUTH_MODE", None)


@pytest.mark.slow
def test_ray_job_submit_runs_a_stage_and_a_retry_reattaches(ray_head, small_world, tmp_path):
    import json
    from dataclasses import replace

    from ray.job_submission import JobSubmissionClient

    from flows.jobs import job_entrypoint
    from flows.steps import step_data

    world = small_world["world"]
    root = str(tmp_path / "root")
    # No retry passes: the world's slow and 500 rows would cost two more timeouts and backoffs in
    # each of the two jobs (test_ingest.py tests retries).
    step = make("ingest", {"source": world["source"], "root": root, "run": "job", "allow-private-addresses": True,
                           "timeout": 2, "image-size": 64, "progress": False, "retries": 0})
    # A step runs under `ray job submit` from its typed config as JSON: the flows' job entrypoint.
    submitted = subprocess.run(
        [ray_head["bin"], "job", "submit", "--address", ray_head["address"], "--submission-id", "json-ingest",
         "--", "python", "-m", "flows.stage_job", json.dumps(step_data(step))],
        env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    assert f"ingest job: {world['rows']} rows in" in submitted.stdout
    # A job already running under the flow's submission id is re-attached, not submitted twice.
    client = JobSubmissionClient(ray_head["address"])
    base = "capfilt-ingest-flowrun123"
    client.submit_job(entrypoint=job_entrypoint(replace(step, run="job2")), submission_id=base + "-a1",
                      runtime_env={"env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}})
    lines = []
    sid = run_job(ray_head["address"], "ingest", step, base_id=base, log=lines.append, client=client)
    assert sid == base + "-a1"
    assert any("re-attaching" in line for line in lines)
    assert any("rows in" in line for line in lines)  # the job's log was streamed
    # Once it succeeded, a further retry does nothing.
    lines.clear()
    assert run_job(ray_head["address"], "ingest", step, base_id=base, log=lines.append, client=client) == sid
    assert "already succeeded" in lines[0]
    assert [j.submission_id for j in client.list_jobs() if j.submission_id.startswith(base)] == [base + "-a1"]


TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    num_query_tokens=4, embed_dim=16, max_position_embeddings=64)


def tiny_train_params(tmp_path, **stage1):
    import json

    from flows.params import TrainParams
    from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

    make_curated_run(tmp_path / "data", "c1", images=16)
    options = {"vision": make_clip_vision(tmp_path / "clip"), "tokenizer": str(make_tokenizer(tmp_path / "tok")),
               "bert": "none", "model-config": json.dumps(TINY_QFORMER), "steps": 6, "batch-size": 8,
               "warmup-steps": 2, "no-augment": True, "log-every": 2, "checkpoint-every": 3, **stage1}
    return TrainParams(root=str(tmp_path / "data"), run="c1", stage1=options)


def test_train_flow_checks_trainer_options_before_any_work(tmp_path):
    params = tiny_train_params(tmp_path, steps="many")
    with pytest.raises(ConfigError, match="^stage train stage1: steps='many' is not an integer"):
        params.steps()
    assert not (tmp_path / "data" / "models").exists()


def test_train_flow_trains_stage1_and_the_checkpoint_records_its_data(prefect_harness, tmp_path):
    import json

    from flows.train import train

    params = tiny_train_params(tmp_path)
    rows = train(params)

    assert {r["metric"] for r in rows} >= {"loss", "itc", "itm", "itg"} and all(r["step"] == 6 for r in rows)
    checkpoint = tmp_path / "data" / "models" / "c1" / "stage1"
    latest = checkpoint / (checkpoint / "latest").read_text().strip()
    lineage = json.loads((latest / "stage1.json").read_text())["lineage"]
    assert lineage["run"] == "c1" and lineage["curated_images"] == 16


def test_bootstrap_rounds_use_the_previous_rounds_models_and_presets_can_be_overridden():
    from capfilt.commands.bootstrap import parse_sets
    from flows.params import BootstrapParams

    params = BootstrapParams(source="src", root="/d", run="b", rounds=2, preset="toy",
                             **parse_sets(("stage1.steps=7", "filter.top-k=1", "round0_caption.captioner=none")))
    curate0, filter0, train0 = params.round_params(0)  # the preset's typed fields by path, --set put over them
    assert curate0.caption == {"config.captioner": "none"} and "score.itm" not in filter0.values
    curate2, filter2, train2 = params.round_params(2)
    assert curate2.caption["config.captioner"] == "/d/models/b-r1/stage2" and filter2.values["score.itm"] == "/d/models/b-r1/stage1"
    assert filter2.values["select.top_k"] == 1 and train2.stage1["config.steps"] == 7 and train2.models == "/d/models/b-r2"
    assert curate0.steps()["ingest"].source == "src"  # round 0 downloads,
    assert curate2.steps()["ingest"].from_run == "b-r0"  # later rounds reuse its images
    assert curate2.steps()["caption"].config.decoding.top_p == 0.9  # typed, from the preset
    assert train2.steps()["stage1"].config.steps == 7 and params.filter_step(2).select["top_k"] == 1
    assert params.pretrain_step().COMMAND == "toy pretrain"
    with pytest.raises(Exception, match="STAGE.OPTION"):
        parse_sets(("steps=3",))


def test_set_pretrain_replaces_a_field_of_the_toy_pretraining_step_and_is_refused_without_one():
    from capfilt.commands.bootstrap import parse_sets
    from capfilt.errors import ConfigError
    from capfilt.presets import TOY_PRETRAIN_WORLD_IMAGES
    from flows.params import BootstrapParams

    plain = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy")
    assert plain.pretrain_step().world_images == TOY_PRETRAIN_WORLD_IMAGES
    bigger = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy",
                             **parse_sets(("pretrain.world_images=12000",)))
    assert bigger.pretrain_step().world_images == 12000 and bigger.pretrain_step().out == "/d/models/b-toy"
    with pytest.raises(ConfigError, match="unknown field 'world_image'"):
        BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy",
                        **parse_sets(("pretrain.world_image=1",))).pretrain_step()
    with pytest.raises(ConfigError, match="pretrains no toy models"):
        BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="blip2",
                        **parse_sets(("pretrain.world_images=1",))).pretrain_step()


@pytest.mark.parametrize("preset, quick", [("toy", True), ("toy", False), ("blip2", False), ("none", False)])
def test_every_presets_options_build_each_stages_typed_config(preset, quick):
    from flows.bootstrap import planned_steps
    from flows.params import BootstrapParams
    from model.train_stage1 import Stage1Config
    from pipeline.caption import CaptionConfig
    from pipeline.ingest import IngestConfig

    params = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset=preset, quick=quick,
                             annotated="/a/ann.parquet", truth="/w/truth.parquet", ablation=True,
                             stage1={} if preset != "none" else {"vision": "v"},
                             stage2={} if preset != "none" else {"llm": "l"},
                             round0_caption={} if preset != "none" else {"captioner": "none"},
                             round0_filter={} if preset != "none" else {"clip": "ViT-B-32"},
                             filter={} if preset != "none" else {"clip": "ViT-B-32"})
    steps = dict(planned_steps(params))  # every option of the preset names a field of its stage's config
    assert isinstance(steps["ingest-r0"].config, IngestConfig) and isinstance(steps["caption-r1"].config, CaptionConfig)
    assert isinstance(steps["stage1-r1"].config, Stage1Config)
    if preset == "toy":
        assert steps["ingest-r0"].config.allow_private_addresses and steps["filter-r0"].dedup.semantic is False
        assert steps["stage1-r0"].config.model["hidden_size"] == 64 and steps["stage1-r0"].config.augment is False
        assert steps["toy-pretrain"].quick is quick


def test_with_an_annotated_set_rounds_finetune_first_and_filter_every_caption_by_calibrated_itm(tmp_path):
    from capfilt.commands.bootstrap import parse_sets
    from flows.bootstrap import check, planned_steps
    from flows.params import BootstrapParams

    params = BootstrapParams(source="src", root="/d", run="b", rounds=2, preset="toy", annotated="/a/ann.parquet",
                             **parse_sets(("finetune_filter.steps=5", "finetune_captioner.lr=1e-5")))
    assert params.finetune_steps(0) == {}
    steps = params.finetune_steps(2)  # round 1's models, finetuned into its models folder
    ft = steps["finetune-filter-r2"]  # from the toy's pretrained Stage 1 (BLIP-2's public one), not round 1's
    assert (ft.annotated, ft.stage1, ft.settings.out) == ("/a/ann.parquet", "/d/models/b-toy/stage1", "/d/models/b-r1/filter")
    assert (ft.settings.batch_size, ft.settings.steps) == (16, 5)  # the toy preset's, then --set
    assert (ft.clip, ft.filter_score) == ("local-dir:/d/models/b-toy/clip", "best")  # its CLIP calibrated beside the ITM
    ftc = steps["finetune-captioner-r2"]  # from the toy's pretrained Stage 2 (its public captioner), not round 1's
    assert (ftc.stage2, ftc.settings.out, ftc.settings.lr) == ("/d/models/b-toy/stage2", "/d/models/b-r1/captioner", 1e-5)
    curate2, filter2, _ = params.round_params(2)
    assert curate2.caption["config.captioner"] == "/d/models/b-r1/captioner"
    assert curate2.caption["config.decoding.num_captions"] == 1  # BLIP: one caption per image, each judged
    assert filter2.values["select.policies"] == ("calibrated",) and filter2.values["score.itm"] == "/d/models/b-r1/filter"
    assert "select.top_k" not in filter2.values and "select.rank_by" not in filter2.values  # a per-caption decision, not a ranking
    order = [label for label, _ in planned_steps(params)]
    assert order.index("finetune-filter-r1") < order.index("ingest-r1") < order.index("filter-r1")
    # the filter and the captioner start from a Stage 1 and a Stage 2 pretrained elsewhere where one is
    # named or the toy preset pretrains one (its default: TOY_STAGE1_STEPS, TOY_STAGE2_STEPS), else from the round's own
    from model.toy.preset import TOY_STAGE1_STEPS, TOY_STAGE2_STEPS

    assert (params.pretrain_step().stage1_steps, params.pretrain_step().stage2_steps) == (TOY_STAGE1_STEPS, TOY_STAGE2_STEPS)
    pretrain = params.pretrain_steps()  # the Stages as a step of their own, which the flow runs beside round 0's trainings
    assert (pretrain["toy-pretrain"].stage1_steps, pretrain["toy-pretrain"].stage2_steps) == (0, 0)
    assert pretrain["toy-blip2"] == params.pretrain_step()
    assert order.index("toy-pretrain") < order.index("toy-blip2") < order.index("stage1-r0") < order.index("finetune-filter-r1")
    own = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                          **parse_sets(("pretrain.stage1_steps=0", "pretrain.stage2_steps=0")))
    assert own.finetune_steps(1)["finetune-filter-r1"].stage1 == "/d/models/b-r0/stage1"
    assert own.finetune_steps(1)["finetune-captioner-r1"].stage2 == "/d/models/b-r0/stage2"
    assert list(own.pretrain_steps()) == ["toy-pretrain"]
    with pytest.raises(ConfigError, match="--stage2-steps needs --stage1-steps"):
        BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                        **parse_sets(("pretrain.stage1_steps=0",))).pretrain_step()
    named = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                            **parse_sets(("finetune_filter.stage1=/m/s1", "finetune_captioner.stage2=/m/s2")))
    assert named.finetune_steps(1)["finetune-filter-r1"].stage1 == "/m/s1"
    assert named.finetune_steps(1)["finetune-captioner-r1"].stage2 == "/m/s2"
    both = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                           **parse_sets(("finetune_filter.folds=2",)))
    with pytest.raises(ConfigError, match="never trained on the images it judges.*--set pretrain.stage1_steps=0"):
        both.finetune_steps(1)
    folds = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                            **parse_sets(("finetune_filter.folds=2", "pretrain.stage1_steps=0", "pretrain.stage2_steps=0")))
    assert folds.finetune_steps(1)["finetune-filter-r1"].folds == 2
    quick = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", quick=True,
                            **parse_sets(("pretrain.stage1_steps=40",)))  # --quick pretrains on the run's own pairs
    with pytest.raises(ConfigError, match="--stage1-steps needs --world-images"):
        quick.pretrain_step()
    without = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy")
    assert without.finetune_steps(1) == {} and without.round_params(1)[1].values["select.policies"] == ("blip2",)
    assert without.round_params(1)[0].caption["config.decoding.num_captions"] == 4  # BLIP-2: ranked, top 2 kept
    # the early check parses the finetune steps as the CLI would: a bad option fails before any work
    source = tmp_path / "src.parquet"
    source.write_bytes(b"")
    bad = BootstrapParams(source=str(source), root=str(tmp_path), run="b", rounds=1, preset="toy",
                          annotated="/a/ann.parquet", **parse_sets(("finetune_filter.batch-size=many",)))
    with pytest.raises(ConfigError, match="^stage finetune filter: batch-size='many' is not an integer"):
        check(bad)
    # the calibrated filter's calibration.json is written by the finetune step: read when it runs
    check(BootstrapParams(source=str(source), root=str(tmp_path), run="b", rounds=1, preset="toy",
                          annotated="/a/ann.parquet"))


def test_each_rounds_captioner_is_evaluated_on_its_own_on_the_held_out_world(tmp_path):
    from flows.bootstrap import planned_steps
    from flows.params import BootstrapParams

    heldout = str(tmp_path)  # a held-out world folder
    params = BootstrapParams(source="src", root="/d", run="b", rounds=2, preset="toy", annotated="/a/ann.parquet",
                             heldout=heldout, truth="/w/truth.parquet")
    steps = dict(planned_steps(params))
    labels = list(steps)
    assert labels[-2:] == ["eval-captioner-of-r1", "eval-captioner-of-r2"]  # after every arm's evaluation
    ev = steps["eval-captioner-of-r1"]  # the captioner round 1 captioned with: round 0's finetuned one
    assert (ev.config.captioner, ev.out, ev.config.heldout) == ("/d/models/b-r0/captioner",) * 2 + (heldout,)
    assert ev.config.stage1 is None and ev.config.truth is None  # its captions only
    assert ev.config.max_images == steps["eval-raw-r0"].config.max_images  # the arms' evaluation set
    for other in (dict(annotated=None), dict(heldout=None), dict(stage2=None), dict(evaluate=False)):
        fields = dict(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                      heldout=heldout) | other
        assert not any(label.startswith("eval-captioner-of") for label, _ in planned_steps(BootstrapParams(**fields)))


def test_the_ablation_trains_blips_table_1_arms_from_round_1s_captions_and_scores(tmp_path):
    from dataclasses import replace

    from flows.bootstrap import model_labels, planned_steps
    from flows.params import BootstrapParams

    params = BootstrapParams(source="src", root="/d", run="b", rounds=1, preset="toy", annotated="/a/ann.parquet",
                             truth="/w/truth.parquet", ablation=True)
    assert list(model_labels(params).values()) == ["raw", "captioner", "filter", "capfilt", "oracle"]
    steps = dict(planned_steps(params))
    assert steps["ingest-captioner"].from_run == "b-r0"  # round 0's images again
    for arm, selection in (("captioner", {"policies": ("none",)}), ("filter", {"caption_sources": ("web",)})):
        step = steps[f"filter-{arm}"]
        assert (step.root, step.run, step.from_run) == ("/d", f"b-{arm}", "b-r1")
        assert selection.items() <= step.select.items() and step.score.itm == "/d/models/b-r0/filter"  # round 1's finetuned filter
    arm, capfilt = steps["stage1-filter"].config, steps["stage1-r1"].config
    assert arm == replace(capfilt, run="b-filter", out="/d/models/b-filter/stage1")  # the same budget as every arm
    labels = [label for label, _ in planned_steps(params)]
    # the oracle trains after round 0 (beside the toy Stage 1), the arms after round 1
    assert labels.index("stage2-r0") < labels.index("oracle") < labels.index("stage2-oracle") < labels.index("finetune-filter-r1")
    assert labels.index("filter-r1") < labels.index("filter-captioner")
    # round 0's and the oracle's models are evaluated before round 1, while the toy BLIP-2 finishes; the rest last
    assert labels.index("stage2-oracle") < labels.index("eval-raw") < labels.index("eval-oracle") < labels.index("finetune-filter-r1")
    assert labels[-3:] == ["eval-captioner", "eval-filter", "eval-capfilt"]
    with pytest.raises(ValueError, match="rounds >= 1"):
        BootstrapParams(source="src", rounds=0, ablation=True)


def test_capfilt_uses_the_prefect_server_that_prefect_api_url_names(prefect_harness):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import ensure_prefect_api

    said = []
    assert ensure_prefect_api(said.append) == PREFECT_API_URL.value()  # the harness's running server
    assert said == [f"Prefect: using the server at {PREFECT_API_URL.value()}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    with temporary_settings({PREFECT_API_URL: dead}):
        with pytest.raises(CapfiltError, match=f"PREFECT_API_URL={dead} does not answer .*prefect server start"):
            ensure_prefect_api(said.append)


def test_a_prefect_server_that_does_not_start_is_one_clear_line(tmp_path):
    # A fresh Prefect home needs its database migrated (15-50 s on a busy 2-core machine); with
    # 1 s allowed the start fails, and the user reads what to do instead of a traceback.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    source = tmp_path / "source.csv"  # a valid source: the early checks pass, and Prefect's start is what fails
    source.write_text("URL,TEXT\nhttp://127.0.0.1:9/a.jpg,a red circle\n")
    done = subprocess.run([sys.executable, "-m", "capfilt.cli", "bootstrap", "--source", str(source),
                           "--root", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Prefect: starting its local server" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("capfilt: error: Prefect's local server did not start within 1 s") and \
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last and "prefect server start" in last
    assert not (tmp_path / "runs").exists()  # no work started


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def task_run_lines():
    """The task runs' log lines, caught on Prefect's task run logger itself (Prefect's config may not propagate)."""
    handler, task_runs = _Lines(), logging.getLogger("prefect.task_runs")
    task_runs.addHandler(handler)
    try:
        yield handler
    finally:
        task_runs.removeHandler(handler)


def test_a_planned_flow_says_step_k_of_n_and_the_time_left(prefect_harness, tmp_path):
    """What bootstrap and demo print: run_step counts against the flow's plan (flows/progress.py)."""
    from dataclasses import dataclass

    from prefect import flow

    from flows.params import Execution
    from flows.progress import step_clock
    from flows.tasks import run_step
    from model.toy.world import WorldConfig, make_world

    @dataclass(frozen=True)
    class WorldStep:  # any step: a command name and the work, as flows/steps/ holds them
        COMMAND = "synth"
        out: str

        def execute(self, say):
            make_world(self.out, WorldConfig(images=4, bad_urls_per_kind=0, duplicates=0, annotated=0))

    @flow(name="two-worlds")
    def two_worlds():
        with step_clock(["synth", "synth"]):
            for i in range(2):
                run_step.with_options(task_run_name=f"world{i}")(f"world{i}", WorldStep(str(tmp_path / f"w{i}")),
                                                                  Execution())

    with task_run_lines() as handler:
        two_worlds()
    lines = [line for line in handler.lines if line.startswith("step ")]
    assert lines[0] == "step 1 of 2: world0 (capfilt synth), in this process"
    assert lines[1].startswith("step 1 of 2: world0 done in ") and lines[1].endswith(" left (estimate from the 1 step so far)")
    assert lines[2] == "step 2 of 2: world1 (capfilt synth), in this process"
    assert lines[3].startswith("step 2 of 2: world1 done in ") and lines[3].endswith("that was the last step")


def test_a_step_run_beside_goes_on_in_a_second_process_and_its_refusal_is_one_clear_error(prefect_harness, tmp_path):
    """The bootstrap flow pretrains the toy Stage 1 beside round 0's trainings (flows/bootstrap.py):
    `run_step.submit(..., beside=True)` runs the step in a second process while the flow goes on,
    relays its lines, and a step that refuses its input fails the flow with its one line."""
    import io

    import pyarrow as pa
    from PIL import Image
    from prefect import flow

    from flows.params import Execution
    from flows.steps.toy import OracleStep
    from flows.tasks import run_step
    from schemas import CURATED, IMAGES

    def jpeg(colour):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(out, format="JPEG")
        return out.getvalue()

    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(3)]
    images = pa.Table.from_pylist([{"sample_id": f"src/{i}", "url": url, "image": jpeg((80 * i, 0, 0)), "caption": "x"}
                                   for i, url in enumerate(urls)])
    RunStore(str(tmp_path), "raw").commit_shard("ingest", "00000", "h", outputs={"images": (IMAGES, images)},
                                                 counts=ShardCounts(rows_in=3, kept=3))
    truth = tmp_path / "truth.parquet"
    pa.parquet.write_table(pa.Table.from_pylist([{"url": u, "true_caption": f"true {i}", "kind": "image"}
                                                 for i, u in enumerate(urls)]), truth)

    @flow(name="beside")
    def beside(truth_path: str):
        future = run_step.with_options(task_run_name="oracle").submit(
            "oracle", OracleStep(truth_path, str(tmp_path), "raw", "o"), Execution(), beside=True)
        run_step.with_options(task_run_name="oracle-here")(
            "oracle-here", OracleStep(str(truth), str(tmp_path), "raw", "here"), Execution())
        future.result()

    with task_run_lines() as handler:
        beside(str(truth))
        with pytest.raises(CapfiltError, match=r"stage oracle failed: .*capfilt: error: .*missing\.parquet"):
            beside(str(tmp_path / "missing.parquet"))
    assert RunStore(str(tmp_path), "o").read("curated", CURATED).column("caption").to_pylist() == ["true 0", "true 1", "true 2"]
    assert RunStore(str(tmp_path), "here").read("curated", CURATED).num_rows == 3
    assert "step oracle: capfilt synth oracle, in a second process, beside the next steps" in handler.lines
    assert "[oracle] oracle run o: 3 images = 3 with true captions + 0 dropped (no ground truth)" in handler.lines


def test_a_flow_that_fails_stops_the_step_it_ran_beside_for_good(tmp_path):
    """stop_beside (the bootstrap flow failed) kills the second process, and its step fails with a
    CapfiltError, which Prefect does not retry: nothing goes on training behind a failed flow."""
    import threading

    from flows import jobs
    from flows.steps.toy import OracleStep

    outcome = {}

    def run():
        try:
            jobs.run_beside(OracleStep(str(tmp_path / "truth.parquet"), str(tmp_path), "raw", "o"), "oracle")
        except Exception as exc:  # noqa: BLE001 - the test looks at what it raised
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 30
    while not jobs._beside and time.time() < deadline:  # the process is started (its interpreter still importing)
        time.sleep(0.01)
    assert len(jobs.stop_beside()) == 1
    thread.join(60)
    assert isinstance(outcome["error"], CapfiltError) and "stopped: the flow it ran beside failed" in str(outcome["error"])
    assert not jobs._beside and jobs.stop_beside() == []


def test_a_step_beside_leaves_this_process_the_other_cores_until_it_is_waited_for(monkeypatch):
    """Beside (flows/jobs.py): while the toy Stage 1 trains in its own process on one thread, this
    process's torch runs on the cores left, and gets them back when the step is waited for, failed or not."""
    import torch

    from flows import jobs

    monkeypatch.setattr("capfilt.environment.usable_cpus", lambda: 4)  # the machine's count, whatever runs the test
    before = torch.get_num_threads()
    torch.set_num_threads(4)

    class Done:  # what Prefect's `submit` returns: a future whose result() waits and raises what the step raised
        def __init__(self, error=None):
            self.error = error

        def result(self):
            if self.error:
                raise self.error

    try:
        beside = jobs.Beside(embedded=True, threads=1)
        beside.wait()  # nothing started: nothing to wait for
        beside.start(lambda: Done())
        assert torch.get_num_threads() == 3
        beside.wait()
        assert torch.get_num_threads() == 4
        failing = jobs.Beside(embedded=True, threads=1)
        failing.start(lambda: Done(CapfiltError("refused")))
        with pytest.raises(CapfiltError, match="refused"):
            failing.wait()
        assert torch.get_num_threads() == 4
        on_a_cluster = jobs.Beside(embedded=False)  # a Ray job runs elsewhere: this process keeps its cores
        on_a_cluster.start(lambda: Done())
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
