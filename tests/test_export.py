"""`capfilt export webdataset`: curated rows become tars that open_clip's and LAVIS's loaders read."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from capfilt.cli import main
from model.toy.scenes import ATTRIBUTE_VALUES, render, true_caption
from pipeline.run_store import RunStore, ShardCounts
from schemas import curated_outputs


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def curated_run(root, shards: dict[str, int]) -> dict[str, dict]:
    """Curated shards as `capfilt filter` commits them; every third image is a PNG (one with alpha)."""
    rng = np.random.default_rng(0)
    by_caption = {}
    for shard, count in shards.items():
        rows = []
        for i in range(count):
            attrs = {name: str(rng.choice(values)) for name, values in ATTRIBUTE_VALUES.items()}
            img = render(attrs, 40, rng)
            fmt = "PNG" if i % 3 == 2 else "JPEG"
            if fmt == "PNG" and i == 2:
                img = img.convert("RGBA")
            for j, source in enumerate(("web", "synthetic")):
                row = dict(sample_id=f"{shard}/{i}", caption_id=f"{shard}/{i}#{source}", image=encoded(img, fmt),
                           image_format=fmt.lower().replace("jpeg", "jpg"), caption=f"{true_caption(attrs)} ({source})",
                           caption_source=source, clip_score=0.3 - j / 10, itm_score=0.9 - j / 10, rank=j,
                           url=f"http://example.com/{shard}/{i}.{fmt.lower()}", width=40, height=40, run_id="r1",
                           original_width=80, original_height=80, license="cc-by", punsafe=0.01 * i,
                           pwatermark=0.02, similarity=0.3, provenance="{}")
                rows.append(row)
                by_caption[row["caption_id"]] = row
        RunStore(str(root), "r1").commit_shard(
            "select", shard, "test", outputs=curated_outputs(rows),
            counts=ShardCounts(rows_in=len(rows), kept=len(rows)))
    return by_caption


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def exported(tmp_path, capsys):
    rows = curated_run(tmp_path / "root", {"s0": 4, "s1": 3})  # 7 images, 14 caption rows
    out = tmp_path / "wds"
    code, stdout, err = run_cli(["export", "webdataset", "--root", str(tmp_path / "root"), "--run", "r1",
                                 "--out", str(out), "--shard-size", "3"], capsys)
    assert code == 0, err
    assert "wrote 7 sample(s) in 3 tar(s)" in stdout and "(2 image(s) re-encoded to JPEG)" in stdout
    return {"rows": rows, "out": out, "tars": sorted(str(p) for p in out.glob("*.tar"))}


def by_image(rows: dict[str, dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in sorted(rows.values(), key=lambda r: r["rank"]):
        grouped.setdefault(row["sample_id"], []).append(row)
    return grouped


def test_one_sample_per_curated_image_with_jpeg_txt_json(exported):
    assert [p.rsplit("/", 1)[1] for p in exported["tars"]] == ["curated-000000.tar", "curated-000001.tar", "curated-000002.tar"]
    seen = {}
    for path in exported["tars"]:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json"))
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            seen[meta["sample_id"]] = (meta, members[f"{key}.jpg"], members[f"{key}.txt"].decode())
    images = by_image(exported["rows"])
    assert sorted(seen) == sorted(images)  # each image once, however many captions it kept
    for sample_id, (meta, jpg, txt) in seen.items():
        kept = images[sample_id]
        assert txt == meta["caption"] == kept[0]["caption"]  # the best caption for one-text loaders
        assert meta["captions"] == [r["caption"] for r in kept] and meta["caption_ids"] == [r["caption_id"] for r in kept]
        assert meta["caption_sources"] == ["web", "synthetic"]
        assert {k: meta[k] for k in ("url", "run_id", "license", "punsafe")} == \
            {k: kept[0][k] for k in ("url", "run_id", "license", "punsafe")}
        if kept[0]["image_format"] == "jpg":
            assert jpg == kept[0]["image"]  # JPEG bytes copied, never re-encoded
        else:
            assert jpg[:3] == b"\xff\xd8\xff" and jpg != kept[0]["image"]
            with Image.open(io.BytesIO(jpg)) as img, Image.open(io.BytesIO(kept[0]["image"])) as original:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == original.size
                # Lossy, but the same picture: mean absolute difference of a few grey levels.
                diff = np.abs(np.asarray(img, np.int16) - np.asarray(original.convert("RGB"), np.int16)).mean()
                assert diff < 8, diff


def test_webdataset_reads_the_tars_as_open_clip_and_lavis_do(exported):
    import webdataset as wds

    images = by_image(exported["rows"])
    # open_clip (training/data.py get_wds_dataset): decode pilrgb, rename jpg;png;jpeg;webp/txt.
    open_clip_style = wds.DataPipeline(
        wds.SimpleShardList(exported["tars"]), wds.tarfile_to_samples(), wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("image", "text"))
    pairs = list(open_clip_style)
    assert len(pairs) == len(images) and all(img.size == (40, 40) and img.mode == "RGB" for img, _ in pairs)
    assert sorted(text for _, text in pairs) == sorted(kept[0]["caption"] for kept in images.values())
    # LAVIS (datasets/laion_dataset.py): to_tuple("jpg", "json") and json["caption"] (a string).
    lavis_style = wds.WebDataset(exported["tars"], shardshuffle=False).decode("pilrgb").to_tuple("jpg", "json")
    samples = list(lavis_style)
    assert all(isinstance(meta["caption"], str) for _, meta in samples)
    assert sorted(c for _, meta in samples for c in meta["captions"]) == sorted(r["caption"] for r in exported["rows"].values())


def test_curated_parquet_reads_as_hugging_face_duckdb_and_pandas_users_expect(tmp_path):
    import datasets
    import duckdb
    import pyarrow.parquet as pq

    rows = curated_run(tmp_path / "root", {"s0": 4, "s1": 3})
    run = tmp_path / "root" / "runs" / "r1"
    # Hugging Face: the image column decodes to PIL, the captions come with it.
    ds = datasets.load_dataset("parquet", data_files=str(run / "curated_images" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 7
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (40, 40)
    assert first["captions"] == [r["caption"] for r in by_image(rows)[first["sample_id"]]]
    # DuckDB: one row per caption, joined to its image; each image's bytes stored once.
    captions = duckdb.sql(f"""
        select c.caption_id, c.license, octet_length(i.image.bytes) as n
        from read_parquet('{run}/curated/*.parquet') c join read_parquet('{run}/curated_images/*.parquet') i using (sample_id)
    """).fetchall()
    assert sorted(c for c, _, _ in captions) == sorted(rows) and all(lic == "cc-by" and n > 0 for _, lic, n in captions)
    stored = duckdb.sql(f"select count(*), count(distinct sample_id) from read_parquet('{run}/curated_images/*.parquet')").fetchall()[0]
    assert stored == (7, 7)
    assert "image" not in pq.read_schema(next((run / "curated").glob("*.parquet"))).names
    # pandas/pyarrow: the source's licence, safety and size columns travel with each caption.
    frame = pq.read_table(run / "curated").to_pandas()
    assert len(frame) == 14 and {"license", "punsafe", "pwatermark", "similarity", "original_width"} <= set(frame.columns)


def test_a_second_export_needs_overwrite_and_an_uncurated_run_is_a_one_line_error(exported, tmp_path, capsys):
    root = str(tmp_path / "root")
    code, _, err = run_cli(["export", "webdataset", "--root", root, "--run", "r1", "--out", str(exported["out"])], capsys)
    assert code == 2 and "already holds 3 curated-*.tar" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run_cli(["export", "webdataset", "--root", root, "--run", "r1", "--out", str(exported["out"]),
                                 "--overwrite"], capsys)
    assert code == 0 and "in 1 tar(s)" in stdout, err
    assert sorted(p.name for p in exported["out"].iterdir()) == ["curated-000000.tar"]  # no stale tars left
    code, _, err = run_cli(["export", "webdataset", "--root", root, "--run", "nothing", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "no curated/ shards" in err and "capfilt filter" in err
