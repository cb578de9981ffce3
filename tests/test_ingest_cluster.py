"""Ingest on a 2-node Ray cluster where one node is removed mid-stage: accounting stays exact."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import pipeline.ray_env  # noqa: F401
    import ray
    from ray.cluster_utils import Cluster
    from pipeline import ingest
    from pipeline.ingest import IngestConfig, IngestRequest
    from pipeline.run_store import RunStore

    source, root = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    store = RunStore(root, "cluster")
    removed = {}

    def remove_worker_after_first_shard():
        while not any(r.status == "done" for r in store.records("ingest")):
            time.sleep(0.1)
        removed["pending"] = sum(r.status != "done" for r in store.records("ingest"))
        cluster.remove_node(worker)

    threading.Thread(target=remove_worker_after_first_shard, daemon=True).start()
    config = IngestConfig(shard_size=5, timeout=2.0, image_size=64, allow_private_addresses=True)
    summary = ingest.run(store, IngestRequest(source, config=config, progress=False))
    records = [r.__dict__ for r in store.records("ingest")]
    print("RESULT " + json.dumps({"summary": summary.__dict__, "records": records, "removed": removed,
                                  "nodes_alive": sum(n["Alive"] for n in ray.nodes())}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_node_removed_mid_stage_still_completes_with_exact_accounting(small_world, tmp_path):
    world = small_world["world"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, world["source"], str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    data = json.loads(line[len("RESULT "):])
    assert data["removed"], "the worker node was never removed"
    assert data["nodes_alive"] == 1
    summary = data["summary"]
    assert summary["rows_in"] == world["rows"] == summary["kept"] + sum(summary["dropped"].values()) + sum(summary["failed"].values())
    assert summary["failed_shards"] == []
    for record in data["records"]:
        assert record["status"] == "done"
        assert record["rows_in"] == record["kept"] + record["rejected"] + record["failed"]
