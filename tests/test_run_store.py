import os
import re

import pyarrow as pa
import pytest

from capfilt.errors import AccountingError, ConfigError
from pipeline.run_store import RunStore, ShardCounts, config_hash, list_files
from schemas import CAPTIONS, REJECTED

CAPTION_ROWS = [
    {"sample_id": "s/0", "caption_id": "s/0#web", "caption_source": "web", "caption_index": 0, "caption": "a cat"},
]
REJECTED_ROWS = [
    {"stage": "caption", "shard": "00000", "sample_id": "s/1", "outcome": "failed", "reason": "undecodable_image", "error_message": "x"},
]


def commit(store, cfg="h1", kept_rows=CAPTION_ROWS, counts=None):
    return store.commit_shard(
        "caption", "00000", cfg,
        outputs={"captions": (CAPTIONS, pa.Table.from_pylist(kept_rows))},
        counts=counts or ShardCounts(rows_in=2, kept=1, failed=1),
        rejected=pa.Table.from_pylist(REJECTED_ROWS),
    )


def test_commit_then_skip_on_same_config_redo_on_other(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    assert not store.is_done("caption", "00000", "h1")
    store.start_shard("caption", "00000", "h1")
    assert not store.is_done("caption", "00000", "h1")  # running is not done
    record = commit(store)
    assert record.status == "done" and record.rows_in == 2 and record.duration_s >= 0
    assert store.is_done("caption", "00000", "h1")
    assert not store.is_done("caption", "00000", "h2")
    assert store.read("captions", CAPTIONS).num_rows == 1
    assert store.read_rejected("caption").column("reason").to_pylist() == ["undecodable_image"]
    # Redoing replaces the shard instead of appending to it.
    commit(store, cfg="h2")
    assert store.read("captions", CAPTIONS).num_rows == 1
    manifest = store.manifest_table()
    assert manifest.num_rows == 1 and manifest.column("config_hash").to_pylist() == ["h2"]


def test_no_temporary_files_are_left_and_partial_writes_are_invisible(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    commit(store)
    for dirpath, _, files in os.walk(tmp_path):
        assert not [f for f in files if ".tmp-" in f], dirpath
    # A crash mid-write leaves only a hidden temporary file, which readers ignore.
    folder = tmp_path / "runs" / "r1" / "captions"
    (folder / ".00001.parquet.tmp-dead").write_bytes(b"partial")
    assert store.shards("captions") == ["00000"]


def test_accounting_violation_fails_loudly_and_writes_nothing(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    with pytest.raises(AccountingError, match=r"rows in = 3 but kept 1 \+ rejected 0 \+ failed 1 = 2; rows were lost"):
        commit(store, counts=ShardCounts(rows_in=3, kept=1, failed=1))
    assert store.shards("captions") == []
    assert store.record("caption", "00000") is None
    with pytest.raises(AccountingError, match="counted twice"):
        ShardCounts(rows_in=1, kept=1, rejected=1).check("x", "y")


def test_outputs_are_validated_before_writing(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    with pytest.raises(Exception, match="missing column 'caption_source'"):
        commit(store, kept_rows=[{"sample_id": "a", "caption_id": "b"}])
    assert store.shards("captions") == []


def test_fsspec_memory_root_works():
    store = RunStore("memory://capfilt-test", "r2")
    commit(store)
    assert store.is_done("caption", "00000", "h1")
    assert store.read_rejected().num_rows == 1
    assert REJECTED.validate(store.read_rejected())


def test_bad_run_id_and_config_hash_stability():
    with pytest.raises(ConfigError, match="run id"):
        RunStore("/tmp", "../escape")
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_fail_shard_records_error(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    store.start_shard("ingest", "00003", "h")
    store.fail_shard("ingest", "00003", "h", "boom")
    record = store.record("ingest", "00003")
    assert record.status == "failed" and record.error == "boom" and record.attempt == 1
    store.start_shard("ingest", "00003", "h")
    assert store.record("ingest", "00003").attempt == 2


def test_a_location_lists_its_files_or_says_in_one_line_what_to_give(tmp_path):
    (tmp_path / "set").mkdir()
    for name in ("b.parquet", "a.jsonl", ".hidden.parquet", "_tmp.parquet", "notes.txt"):
        (tmp_path / "set" / name).write_text("")
    fs, root, files = list_files(str(tmp_path / "set"), (".parquet", ".jsonl"), "--x", "a set")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.jsonl", "b.parquet"]  # sorted, hidden and _ files left out
    assert list_files(files[0], (".jsonl",), "--x", "a set")[2] == [files[0]]  # a file is itself
    (tmp_path / "empty").mkdir()
    for location, message in ((tmp_path / "nope", "no such file or folder; give a set."),
                              (tmp_path / "empty", "the folder holds no .parquet, .jsonl files; give a set."),
                              (tmp_path / "set" / "notes.txt", "expected a .parquet, .jsonl file or a folder of them."),
                              ("nosuchprotocol://bucket/set", "cannot open this location")):
        with pytest.raises(ConfigError, match=f"^--x '?{location}'?: {re.escape(message)}"):
            list_files(str(location), (".parquet", ".jsonl"), "--x", "a set")
