"""`capfilt export webdataset`: curated rows become tars that open_clip's and LAVIS's loaders read."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from capfilt.cli import main
from pipeline.run_store import RunStore, ShardCounts
from pipeline.synth import ATTRIBUTE_VALUES, render, true_caption
from schemas import CURATED


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
                           provenance="{}")
                rows.append(row)
                by_caption[row["caption_id"]] = row
        RunStore(str(root), "r1").commit_shard(
            "select", shard, "test", outputs={"curated": (CURATED, CURATED.from_pylist(rows))},
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
    rows = curated_run(tmp_path / "root", {"s0": 4, "s1": 3})  # 14 caption rows
    out = tmp_path / "wds"
    code, stdout, err = run_cli(["export", "webdataset", "--root", str(tmp_path / "root"), "--run", "r1",
                                 "--out", str(out), "--shard-size", "5"], capsys)
    assert code == 0, err
    assert "wrote 14 sample(s) in 3 tar(s)" in stdout and "(4 image(s) re-encoded to JPEG)" in stdout
    return {"rows": rows, "out": out, "tars": sorted(str(p) for p in out.glob("*.tar"))}


def test_one_sample_per_curated_caption_with_jpeg_txt_json(exported):
    assert [p.rsplit("/", 1)[1] for p in exported["tars"]] == ["curated-000000.tar", "curated-000001.tar", "curated-000002.tar"]
    seen = {}
    for path in exported["tars"]:
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".", 1)[0] for name in members})
        assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json"))
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            seen[meta["caption_id"]] = (meta, members[f"{key}.jpg"], members[f"{key}.txt"].decode())
    rows = exported["rows"]
    assert sorted(seen) == sorted(rows)
    for caption_id, (meta, jpg, txt) in seen.items():
        row = rows[caption_id]
        assert txt == meta["caption"] == row["caption"]
        assert {k: meta[k] for k in ("sample_id", "caption_source", "url", "run_id")} == \
            {k: row[k] for k in ("sample_id", "caption_source", "url", "run_id")}
        assert meta["clip_score"] == pytest.approx(row["clip_score"]) and meta["itm_score"] == pytest.approx(row["itm_score"])
        if row["image_format"] == "jpg":
            assert jpg == row["image"]  # JPEG bytes copied, never re-encoded
        else:
            assert jpg[:3] == b"\xff\xd8\xff" and jpg != row["image"]
            with Image.open(io.BytesIO(jpg)) as img, Image.open(io.BytesIO(row["image"])) as original:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == original.size
                # Lossy, but the same picture: mean absolute difference of a few grey levels.
                diff = np.abs(np.asarray(img, np.int16) - np.asarray(original.convert("RGB"), np.int16)).mean()
                assert diff < 8, diff


def test_webdataset_reads_the_tars_as_open_clip_and_lavis_do(exported):
    import webdataset as wds

    rows = exported["rows"]
    # open_clip (training/data.py get_wds_dataset): decode pilrgb, rename jpg;png;jpeg;webp/txt.
    open_clip_style = wds.DataPipeline(
        wds.SimpleShardList(exported["tars"]), wds.tarfile_to_samples(), wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("image", "text"))
    pairs = list(open_clip_style)
    assert len(pairs) == len(rows) and all(img.size == (40, 40) and img.mode == "RGB" for img, _ in pairs)
    assert sorted(text for _, text in pairs) == sorted(r["caption"] for r in rows.values())
    # LAVIS (datasets/laion_dataset.py): to_tuple("jpg", "json") and json["caption"].
    lavis_style = wds.WebDataset(exported["tars"], shardshuffle=False).decode("pilrgb").to_tuple("jpg", "json")
    samples = list(lavis_style)
    assert sorted(meta["caption"] for _, meta in samples) == sorted(r["caption"] for r in rows.values())
    assert all(meta["caption"] == rows[meta["caption_id"]]["caption"] for _, meta in samples)


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
