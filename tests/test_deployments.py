"""prefect.yaml deploys against a Prefect API, and a deployment run executes on a process worker."""

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prefect_yaml_deploys_and_a_deployment_run_curates_and_trains(small_world, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness


    bin_dir = Path(sys.executable).parent
    # Deploy a copy of the repo's prefect.yaml whose on-demand deployment points at the world.
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"nightly-incremental-curate", "curate-on-demand",
                                                        "train-on-demand", "bootstrap-on-demand"}
    assert spec["deployments"][0]["schedules"][0]["cron"]
    with prefect_test_harness(server_startup_timeout=120):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
        subprocess.run([str(bin_dir / "prefect"), "work-pool", "create", "capfilt-process", "--type", "process"],
                       check=True, env=env, cwd=REPO, capture_output=True, timeout=120)
        deployed = subprocess.run([str(bin_dir / "prefect"), "--no-prompt", "deploy", "--all"],
                                  env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

        async def deployments():
            async with get_client() as client:
                response = await client.request("POST", "/deployments/filter", json={"limit": 50, "offset": 0})
                return response.json()

        names = {d["name"]: d for d in asyncio.run(deployments())}
        assert {"nightly-incremental-curate", "curate-on-demand", "train-on-demand", "bootstrap-on-demand"} <= set(names)
        assert names["nightly-incremental-curate"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

        # Run the bootstrap deployment on the synthetic world with a process worker: round 0 only
        # (curate the raw pairs, pretrain the toy models, filter, train Stage 1 + 2), few steps,
        # ingest without retry passes (the world's slow and 500 rows would cost two more timeouts
        # and backoffs; test_ingest.py tests retries).
        params = {"params": {
            "source": small_world["world"]["source"], "root": str(tmp_path / "root"), "run": "deployed",
            "rounds": 0, "preset": "toy", "quick": True, "evaluate": False,
            "ingest": {"timeout": 2, "retries": 0}, "stage1": {"steps": 20, "itm-random-negative-steps": 10},
            "stage2": {"steps": 10},
        }}
        started = subprocess.run(
            [str(bin_dir / "prefect"), "deployment", "run", "bootstrap/bootstrap-on-demand", "--params",
             __import__("json").dumps(params)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-2000:]
        worker = subprocess.run(
            [str(bin_dir / "prefect"), "worker", "start", "--pool", "capfilt-process", "--run-once"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]

        async def runs():
            async with get_client() as client:
                response = await client.request("POST", "/flow_runs/filter", json={"limit": 10, "offset": 0})
                return response.json()

        states = [r["state"]["type"] for r in asyncio.run(runs()) if r["deployment_id"]]
        assert states == ["COMPLETED"], worker.stdout[-3000:]

        async def artifacts():
            async with get_client() as client:
                response = await client.request("POST", "/artifacts/latest/filter", json={"limit": 100, "offset": 0})
                return response.json()

        by_key = {a["key"]: a for a in asyncio.run(artifacts()) if a.get("key")}
        counts = {row["stage"]: row for row in __import__("json").loads(by_key["curate-deployed-r0-counts"]["data"])}
        assert counts["ingest"]["rows_in"] == small_world["world"]["rows"]
        assert counts["select"]["kept"] > 0
        assert any(k.startswith("train-deployed-r0") for k in by_key), sorted(by_key)
    from pipeline.run_store import RunStore, stage_totals

    totals = {t["stage"]: t for t in stage_totals(RunStore(str(tmp_path / "root"), "deployed-r0"))}
    assert totals["ingest"]["rows_in"] == small_world["world"]["rows"]
    assert totals["caption"]["kept"] == totals["ingest"]["kept"]
    models = tmp_path / "root" / "models" / "deployed-r0"
    assert (models / "stage1" / "latest").exists() and (models / "stage2" / "latest").exists()
    shutil.rmtree(tmp_path / "root", ignore_errors=True)
