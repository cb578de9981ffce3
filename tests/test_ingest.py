"""Ingest against the synthetic world's server: every row ends somewhere, with its reason."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.errors import ConfigError
from model.toy.server import WorldServer
from model.toy.world import WorldConfig, make_world
from pipeline import ingest
from pipeline.ingest import IngestConfig, IngestRequest, final_rejected
from pipeline.ingest_download import download_shard
from pipeline.ingest_policy import classify_error
from pipeline.ingest_source import mark_cross_shard_duplicates, plan_shards
from pipeline.run_store import RunStore
from schemas import IMAGES, REJECTED

# The default two retry passes (a short backoff): a good image that times out once on a loaded
# machine is asked again, as in a real run.
FAST = dict(timeout=2.0, image_size=64, allow_private_addresses=True, retry_backoff=0.2)


def whole_source_spec(world, **kwargs):
    specs = plan_shards(world["source"], 10_000, IngestConfig().columns)
    assert len(specs) == 1
    return specs[0]


def truth_of(world):
    return {r["url"]: r for r in pq.read_table(world["ground_truth"]).to_pylist()}


def test_each_bad_url_kind_lands_in_rejected_with_its_reason(small_world):
    world = small_world["world"]
    images, rejected, stats = download_shard(whole_source_spec(world), IngestConfig(**FAST))
    IMAGES.validate(images)
    REJECTED.validate(rejected)
    truth = truth_of(world)
    kept_urls = set(images.column("url").to_pylist())
    reasons = {r["url"]: r["reason"] for r in rejected.to_pylist()}
    for url, row in truth.items():
        if row["kind"] in ("image", "duplicate"):
            assert url in kept_urls, (url, reasons.get(url))
        else:
            assert reasons.get(url) == row["expected_reason"], (row["kind"], reasons.get(url))
    # Nothing lost, nothing twice.
    ids = images.column("sample_id").to_pylist() + rejected.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(truth) == stats["rows_in"]
    assert stats["kept"] + stats["rejected"] + stats["failed"] == stats["rows_in"]
    # Decisions are 'dropped', errors 'failed'.
    outcome = {r["reason"]: r["outcome"] for r in rejected.to_pylist()}
    assert outcome["opt_out"] == outcome["too_many_pixels"] == "dropped"
    assert outcome["http_404"] == outcome["timeout"] == "failed"
    # Provenance of downloaded rows: hashes, sizes, the LAION extras passed through.
    row = images.to_pylist()[0]
    assert len(row["sha256"]) == 64 and row["width"] == 64 and row["license"] == "cc-by-4.0"
    assert row["image"][:2] == b"\xff\xd8"


def test_private_addresses_are_refused_by_default(small_world):
    world = small_world["world"]
    images, rejected, stats = download_shard(whole_source_spec(world), IngestConfig(timeout=2.0))
    assert images.num_rows == 0
    assert set(rejected.column("reason").to_pylist()) == {"private_address"}
    assert "--allow-private-addresses" in rejected.column("error_message")[0].as_py()
    assert stats["rejected"] == stats["rows_in"]


def test_url_and_hash_blocklists(small_world):
    world = small_world["world"]
    truth = list(truth_of(world).values())
    duplicate = next(r for r in truth if r["kind"] == "duplicate")
    other = next(r for r in truth if r["kind"] == "image" and r["url"] != duplicate["duplicate_of"])
    first, _, _ = download_shard(whole_source_spec(world), IngestConfig(**FAST))
    digest = next(r["sha256"] for r in first.to_pylist() if r["url"] == duplicate["url"])
    config = IngestConfig(**FAST, url_blocklist=(other["url"],), hash_blocklist=(digest,))
    images, rejected, _ = download_shard(whole_source_spec(world), config)
    blocked = {r["url"] for r in rejected.to_pylist() if r["reason"] == "blocklisted"}
    # The URL itself, and both URLs that serve the blocklisted bytes.
    assert blocked == {other["url"], duplicate["url"], duplicate["duplicate_of"]}
    assert not blocked & set(images.column("url").to_pylist())


def test_other_formats_column_mapping_and_invalid_urls(small_world, tmp_path):
    good = next(r["url"] for r in truth_of(small_world["world"]).values() if r["kind"] == "image")
    table = pa.table({"link": [good, None, "ftp://x/y.jpg", "not a url"], "alt": ["a", "b", "c", "d"]})
    csv_path = tmp_path / "src.csv"
    pa.csv.write_csv(table, csv_path)
    jsonl_path = tmp_path / "src.jsonl"
    jsonl_path.write_text("\n".join(
        '{"link": %s, "alt": "x"}' % ("null" if u is None else '"%s"' % u) for u in table.column("link").to_pylist()
    ))
    config = IngestConfig(**FAST, columns=IngestConfig().columns.__class__(URL="link", TEXT="alt"))
    for path in (csv_path, jsonl_path):
        specs = plan_shards(str(path), 10, config.columns)
        images, rejected, _ = download_shard(specs[0], config)
        assert images.column("url").to_pylist() == [good]
        assert rejected.column("reason").to_pylist() == ["invalid_url"] * 3
        assert rejected.column("sample_id").to_pylist() == ["src/1", "src/2", "src/3"]


def test_a_url_an_earlier_shard_or_file_has_is_marked_for_its_shard(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    u = [f"http://127.0.0.1:1/{i}.jpg" for i in range(4)]
    # a: shards a-0 [u0 u1 u0] (repeat within the shard: left to the shard) and a-1 [u1 u2 None];
    # b: shards b-0 [u2 u3 u0] and b-1 [None]: each repeat of an earlier shard names the URL's first row
    pq.write_table(pa.table({"URL": [u[0], u[1], u[0], u[1], u[2], None], "TEXT": ["x"] * 6}), source / "a.parquet")
    pa.csv.write_csv(pa.table({"URL": [u[2], u[3], u[0], None], "TEXT": ["y"] * 4}), source / "b.csv")
    columns = IngestConfig().columns
    specs = mark_cross_shard_duplicates(plan_shards(str(source), 3, columns), columns)
    assert {s.shard: s.duplicate_of for s in specs} == {
        "a-00000": (), "a-00001": (("a/3", "a/1"),), "b-00000": (("b/0", "a/4"), ("b/2", "a/0")), "b-00001": ()}
    images, rejected, _ = download_shard(specs[1], IngestConfig(**FAST))  # a/3 dropped before any download
    row = next(r for r in rejected.to_pylist() if r["sample_id"] == "a/3")
    assert (row["reason"], row["outcome"], row["duplicate_of"]) == ("duplicate_url", "dropped", "a/1")


def test_classify_error_maps_img2dataset_messages():
    assert classify_error("HTTP Error 404: Not Found") == "http_404"
    assert classify_error("HTTP Error 503: Service Unavailable") == "http_503"
    assert classify_error("<urlopen error timed out>") == "timeout"
    assert classify_error("The read operation timed out") == "timeout"
    assert classify_error("Use of image disallowed by X-Robots-Tag directive") == "opt_out"
    assert classify_error("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.") == "redirect_loop"
    assert classify_error("<urlopen error [Errno -2] Name or service not known>") == "dns_error"
    assert classify_error("something new") == "download_error"


def test_bad_config_and_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="--shard-size"):
        IngestConfig(shard_size=0)
    with pytest.raises(ConfigError, match="no such file"):
        plan_shards(str(tmp_path / "missing"), 10, IngestConfig().columns)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        plan_shards(str(tmp_path / "empty"), 10, IngestConfig().columns)


def test_transient_failures_are_retried_in_the_run_after_a_backoff(tmp_path):
    # A URL whose server answers 503 twice and then serves it, one that always answers 500, and
    # a 404: with the default two retry passes the flaky row is kept, the 500 is asked three
    # times and fails, the 404 (not transient) is asked once.
    directory = tmp_path / "world"
    make_world(directory, WorldConfig(images=4, seed=5, bad_url_kinds=("http_500", "http_404"), duplicates=0))
    world = __import__("model.toy.world", fromlist=["load_world"]).load_world(directory)
    config = IngestConfig(timeout=2.0, image_size=64, allow_private_addresses=True, retry_backoff=0.2)
    assert config.retries == 2  # the default
    with WorldServer(directory) as server:
        routes = server.httpd.RequestHandlerClass.routes
        flaky = next(p for p, r in routes.items() if r["kind"] == "file" and r["file"] == "000001.jpg")
        routes[flaky] = {"kind": "flaky", "failures": 2, "code": 503, "file": "000001.jpg",
                         "content_type": "image/jpeg"}
        counted = {}
        for code in (500, 404):  # the same answers, counted
            path = next(p for p, r in routes.items() if r.get("code") == code)
            routes[path] = counted[code] = {"kind": "flaky", "failures": 10**6, "code": code, "file": "000000.jpg"}
        images, rejected, stats = download_shard(whole_source_spec(world), config)
    assert any(url.endswith(flaky) for url in images.column("url").to_pylist())
    assert routes[flaky]["requests"] == 3 and counted[500]["requests"] == 3 and counted[404]["requests"] == 1
    assert sorted(r["reason"] for r in rejected.to_pylist()) == ["http_404", "http_500"]
    assert stats["kept"] == 4 and stats["kept"] + stats["rejected"] + stats["failed"] == stats["rows_in"]


def test_retry_failed_requeues_retryable_rows_and_keeps_history(ray_local, tmp_path):
    directory = tmp_path / "world"
    make_world(directory, WorldConfig(images=6, seed=3, bad_url_kinds=("http_500", "http_404"), duplicates=0))
    world = __import__("model.toy.world", fromlist=["load_world"]).load_world(directory)
    config = IngestConfig(**FAST, shard_size=4)
    with WorldServer(directory) as server:
        first = ingest.run(RunStore(str(tmp_path / "root"), "r"), IngestRequest(world["source"], config=config, progress=False))
        assert first.failed == {"http_404": 1, "http_500": 1}
        # The server recovers: the 500 route now serves an image.
        routes = server.httpd.RequestHandlerClass.routes
        bad = next(p for p, r in routes.items() if r.get("code") == 500)
        routes[bad] = {"kind": "file", "file": "000000.jpg", "content_type": "image/jpeg"}
        second = ingest.run(RunStore(str(tmp_path / "root"), "r"),
                            IngestRequest(world["source"], config=config, retry_failed=True, progress=False))
    assert second.kept == first.kept + 1
    assert second.failed == {"http_404": 1}  # 404 is not retryable
    assert second.rows_in == first.rows_in == second.kept + second.rows_dropped + second.rows_failed
    store = RunStore(str(tmp_path / "root"), "r")
    history = store.read_rejected("ingest").to_pylist()
    assert sorted(r["reason"] for r in history) == ["http_404", "http_500"]  # attempt 1 kept on record
    assert [r["reason"] for r in final_rejected(store).to_pylist()] == ["http_404"]


def test_a_later_round_reuses_the_downloads_of_round_0(ray_local, tmp_path):
    directory = tmp_path / "world"
    world = make_world(directory, WorldConfig(images=6, seed=4, bad_url_kinds=("http_404",), duplicates=0))
    root = str(tmp_path / "root")
    with WorldServer(directory):
        first = ingest.run(RunStore(root, "r0"), IngestRequest(world["source"], config=IngestConfig(**FAST, shard_size=4),
                                                             progress=False))
    # The server is gone: round 1 could not download anything, and needs not.
    reused = ingest.run(RunStore(root, "r1"), IngestRequest(from_run="r0"))
    assert (reused.rows_in, reused.kept, reused.dropped, reused.failed) == (
        first.rows_in, first.kept, first.dropped, first.failed)
    assert _images_rows(root, "r1") == _images_rows(root, "r0")
    r0, r1 = RunStore(root, "r0"), RunStore(root, "r1")
    for shard in r0.shards("images"):  # the same bytes on disk, not a second copy
        assert os.stat(r0.shard_path("images", shard)).st_ino == os.stat(r1.shard_path("images", shard)).st_ino
    assert all(r.status == "done" and r.extra["images_from"] == "r0" for r in r1.records("ingest"))
    again = ingest.run(RunStore(root, "r1"), IngestRequest(from_run="r0"))
    assert again.shards_skipped == again.shards == len(r0.records("ingest"))
    with pytest.raises(ConfigError, match="run 'nothing' under .* has no finished ingest shards"):
        ingest.run(RunStore(root, "r2"), IngestRequest(from_run="nothing"))


def _images_rows(root, run):
    table = RunStore(root, run).read("images", IMAGES)
    return sorted(zip(table.column("sample_id").to_pylist(), table.column("sha256").to_pylist()))


@pytest.mark.slow
def test_resume_after_killed_run_gives_the_same_rows(ray_local, small_world, tmp_path):
    world = small_world["world"]
    root = str(tmp_path / "root")
    args = [sys.executable, "-m", "capfilt.cli", "ingest", "--source", world["source"], "--root", root,
            "--run", "killed", "--shard-size", "6", "--allow-private-addresses", "--timeout", "2",
            "--image-size", "64", "--retry-backoff", "0.2", "--no-progress"]  # the settings of FAST
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = RunStore(root, "killed")
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.status == "done" for r in store.records("ingest")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill the process (and its local Ray), not a flag
    proc.wait()
    # A shard's commit runs in a Ray worker, which may outlive its killed driver by a moment: a
    # shard it commits then is done, and the resumed run must skip it too. Wait until the records
    # stop changing, so the shards counted here are all the kill left done.
    done_before, stable_since = set(), time.time()
    while time.time() - stable_since < 3 and time.time() < deadline + 30:
        now = {r.shard for r in store.records("ingest") if r.status == "done"}
        if now != done_before:
            done_before, stable_since = now, time.time()
        time.sleep(0.2)
    assert done_before, "the run was killed before any shard finished"
    assert len(done_before) < len(plan_shards(world["source"], 6, IngestConfig().columns)), "killed too late"
    config = IngestConfig(**FAST, shard_size=6)
    resumed = ingest.run(RunStore(root, "killed"), IngestRequest(world["source"], config=config, progress=False))
    assert resumed.shards_skipped == len(done_before)
    ingest.run(RunStore(root, "straight"), IngestRequest(world["source"], config=config, progress=False))
    assert _images_rows(root, "killed") == _images_rows(root, "straight")
    ids = [r[0] for r in _images_rows(root, "killed")] + RunStore(root, "killed").read_rejected("ingest").column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == world["rows"]
    for record in RunStore(root, "killed").records("ingest"):
        assert record.status == "done" and record.rows_in == record.kept + record.rejected + record.failed
    # A rerun does no work.
    again = ingest.run(RunStore(root, "killed"), IngestRequest(world["source"], config=config, progress=False))
    assert again.shards_skipped == again.shards and (again.dropped, again.failed) == (resumed.dropped, resumed.failed)


def _capfilt(*args):
    return subprocess.run([sys.executable, "-m", "capfilt.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_source_with_nothing_to_download_is_an_error_that_says_why(tmp_path):
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image_url": ["http://example.invalid/a.jpg"], "caption": ["a"]}), wrong)
    done = _capfilt("ingest", "--source", str(wrong), "--root", str(tmp_path), "--run", "w")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no URL column 'URL'; found columns ['image_url', 'caption']" in done.stderr and "--url-col" in done.stderr
    assert not (tmp_path / "runs" / "w" / "images").exists()  # refused before any shard ran
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}), empty)
    done = _capfilt("ingest", "--source", str(empty), "--root", str(tmp_path), "--run", "e")
    assert done.returncode == 2 and done.stderr.strip() == f"capfilt: error: ingest e: {empty} has no rows: " \
        "nothing to download (is it the right file or folder?)", done.stderr


def test_a_run_that_keeps_little_names_its_top_reasons_and_their_fixes():
    from pipeline.ingest import IngestSummary

    refused = IngestSummary(run_id="r", shards=1, rows_in=315, kept=0, dropped={"private_address": 315})
    assert refused.problem("s") == ("nothing of 315 rows kept (315 lost): 315 of 315 private_address: pass "
                                    "--allow-private-addresses to download from a local or private server")
    mostly = IngestSummary(run_id="r", shards=1, rows_in=10, kept=3, failed={"timeout": 5, "http_503": 2})
    assert mostly.problem("s").startswith("only 3 of 10 rows kept (7 lost): 5 of 10 timeout: raise --timeout")
    assert "2 of 10 http_503: the server failed; rerun with --retry-failed" in mostly.problem("s")
    assert IngestSummary(run_id="r", shards=1, rows_in=10, kept=9, failed={"timeout": 1}).problem("s") is None


def test_a_small_ingest_without_ray_downloads_in_the_cli_process_and_writes_what_ray_tasks_write(
        ray_local, small_world, tmp_path):
    world = small_world["world"]
    root = str(tmp_path / "root")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "capfilt.cli", "ingest", "--source", world["source"], "--root", root,
                           "--run", "here", "--shard-size", "20", "--allow-private-addresses", "--timeout", "2",
                           "--image-size", "64", "--retry-backoff", "0.2", "--no-progress"],  # the settings of FAST
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "downloaded in this process, not on Ray" in done.stdout and "Ray's start-up" in done.stdout, done.stdout
    config = IngestConfig(**FAST, shard_size=20)
    on_ray = ingest.run(RunStore(root, "ray"), IngestRequest(world["source"], config=config, progress=False))
    assert on_ray.executor == "ray" and "downloaded in this process" not in on_ray.line()  # Ray runs: it is used
    assert _images_rows(root, "here") == _images_rows(root, "ray")

    def rejected(run):
        table = RunStore(root, run).read_rejected("ingest")
        return sorted(zip(table.column("sample_id").to_pylist(), table.column("reason").to_pylist()))

    assert rejected("here") == rejected("ray") and rejected("here")
