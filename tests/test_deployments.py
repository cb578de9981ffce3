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
def test_prefect_yaml_deploys_and_a_deployment_run_curates(small_world, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from model.captioners import save_random_captioner

    bin_dir = Path(sys.executable).parent
    # Deploy a copy of the repo's prefect.yaml whose on-demand deployment points at the world.
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"nightly-incremental-curate", "curate-on-demand"}
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
        assert {"nightly-incremental-curate", "curate-on-demand"} <= set(names)
        assert names["nightly-incremental-curate"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

        # Run the on-demand deployment on the synthetic world with a process worker.
        captioner = save_random_captioner(str(tmp_path / "captioner"))
        params = {"params": {
            "source": small_world["world"]["source"], "root": str(tmp_path / "root"), "run": "deployed",
            "ingest": {"allow-private-addresses": True, "timeout": 2, "image-size": 64},
            "caption": {"captioner": captioner, "num-captions": 1},
        }}
        started = subprocess.run(
            [str(bin_dir / "prefect"), "deployment", "run", "curate/curate-on-demand", "--params",
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
    from pipeline.run_store import RunStore, stage_totals

    totals = {t["stage"]: t for t in stage_totals(RunStore(str(tmp_path / "root"), "deployed"))}
    assert totals["ingest"]["rows_in"] == small_world["world"]["rows"]
    assert totals["caption"]["kept"] == totals["ingest"]["kept"]
    shutil.rmtree(tmp_path / "root", ignore_errors=True)
