import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.errors import SchemaError
from schemas import ALL, CAPTIONS, SOURCE, SourceColumns, to_canonical


def test_every_schema_is_versioned_and_documented():
    for name, spec in ALL.items():
        meta = spec.arrow.metadata
        assert meta[b"capfilt.schema"] == name.encode()
        assert int(meta[b"capfilt.schema_version"]) >= 1
        assert all(doc for doc in spec.describe().values()), name


def test_validate_names_file_column_types_and_fix(tmp_path):
    table = pa.table({"URL": pa.array([1.5, 2.5])})
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(SchemaError) as err:
        SOURCE.validate(str(path))
    message = str(err.value)
    assert str(path) in message and "'URL'" in message
    assert "double" in message and "string" in message
    assert "--url-col" in message  # says what to do


def test_validate_missing_column_and_nulls():
    with pytest.raises(SchemaError, match="missing column 'caption_id'"):
        CAPTIONS.validate(pa.table({"sample_id": ["a"]}))
    rows = [{"sample_id": "a", "caption_id": None, "caption_source": "web", "caption_index": 0}]
    table = pa.Table.from_pylist(rows, schema=CAPTIONS.arrow)
    with pytest.raises(SchemaError, match="must not be null.*first at row 0"):
        CAPTIONS.validate(table)


def test_validate_accepts_compatible_physical_types(tmp_path):
    table = pa.table({"URL": pa.array(["http://x/a.jpg"], pa.large_string()), "TEXT": pa.array(["a"]).dictionary_encode()})
    SOURCE.validate(table)


def test_validate_rejects_another_artifact(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(CAPTIONS.empty(), path)
    with pytest.raises(SchemaError, match="'captions' artifact, expected 'source'"):
        SOURCE.validate(str(path))


def test_validate_unreadable_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        SOURCE.validate(str(path))


def test_source_column_mapping():
    table = pa.table({"image_url": ["http://h/a.jpg"], "alt": ["a cat"], "w": [10]})
    canonical = to_canonical(table, SourceColumns.from_mapping({"URL": "image_url", "TEXT": "alt", "WIDTH": "w"}))
    assert canonical.schema.equals(SOURCE.arrow, check_metadata=False)
    assert canonical.to_pylist()[0]["TEXT"] == "a cat"
    assert canonical.to_pylist()[0]["HEIGHT"] is None
    with pytest.raises(SchemaError, match="no URL column 'URL'"):
        to_canonical(table)
    with pytest.raises(SchemaError, match="unknown source column mapping"):
        SourceColumns.from_mapping({"url": "x"})
    # A null URL is a row for ingest to reject with a reason, not a broken source.
    assert to_canonical(pa.table({"URL": pa.array([None, "http://h/a"], pa.string())})).num_rows == 2
