"""Bad input, command by command: one clear `capfilt: error:` line, or a row dropped with a reason.

Every row of TABLE runs one `capfilt` command in-process on a broken input and asserts:
- a user error: exit 2, exactly one line that starts with `capfilt: error:` and names the file,
  row or option and the fix (the row's `expect` substrings), no traceback anywhere, and no file
  left behind that a rerun would trust (the data root and every --out are unchanged);
- a bad *row* inside good input (a 1 MB caption, NUL bytes, invalid UTF-8, an unreadable image,
  a repeated URL): the command succeeds and that row ends in rejected/ with its reason, because
  one bad row must not cost a whole source ("nothing lost": kept, dropped with a reason or failed).
Rows that need Ray (ingest downloads) are few and share the session's local Ray.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from caption_helpers import commit_image_shards
from capfilt.cli import main
from pipeline.run_store import RunStore, ShardCounts
from schemas import curated_outputs

MEGABYTE_CAPTION = "a red cube " * 100_000  # 1.1 MB of text, 300k words


# -- the inputs ------------------------------------------------------------------------------------
def png(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string column holding bytes that are not UTF-8 (what a careless writer can put in Parquet)."""
    offsets, data = [0], b""
    for v in values:
        data += v
        offsets.append(len(data))
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]),
                                                             pa.py_buffer(data)])


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = png((int(self.path.strip("/").split(".")[0] or 0) * 40 % 255, 90, 90))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@dataclass
class World:
    dir: Path
    root: Path
    base: str  # http://127.0.0.1:<port>/ serving a PNG at every path

    def p(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    root = d / "root"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    w = World(d, root, base)

    good = {"URL": [base + "1.png", base + "2.png"], "TEXT": ["a red cube", "a blue ball"]}
    pq.write_table(pa.table(good), d / "good.parquet")
    pq.write_table(pa.table({"image_url": good["URL"], "caption": good["TEXT"]}), d / "wrong_columns.parquet")
    pq.write_table(pa.table({"URL": pa.array([["http://a/1.png"]], pa.list_(pa.string())), "TEXT": ["x"]}),
                   d / "wrong_type.parquet")
    pq.write_table(pa.table({"URL": good["URL"], "TEXT": good["TEXT"], "WIDTH": ["640", "wide"]}),
                   d / "wrong_values.parquet")
    (d / "wrong_type.csv").write_text("URL,TEXT,WIDTH\nhttp://a/1.png,a cube,wide\n")
    pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}), d / "empty.parquet")
    (d / "zero_bytes.parquet").write_bytes(b"")
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (d / "corrupt.jsonl").write_text('{"URL": "http://a/1.png", "TEXT": "ok"}\n{"URL": "http://a/2.png", "TEXT": \n')
    (d / "invalid_utf8.csv").write_bytes(b"URL,TEXT\nhttp://a/1.png,a cube\nhttp://a/2.png,caf\xe9 \xff\xfe\n")
    (d / "empty_folder").mkdir()
    # Sources with one good row and one bad row each: the bad row is dropped, the run goes on.
    pq.write_table(pa.table({"URL": [base + "1.png", base + "2.png"], "TEXT": ["a red cube", MEGABYTE_CAPTION]}),
                   d / "megabyte_caption.parquet")
    pq.write_table(pa.table({"URL": [base + "1.png", base + "2.png"], "TEXT": ["a red cube", "a blue\x00ball\x00"]}),
                   d / "nul_caption.parquet")
    pq.write_table(pa.table({"URL": pa.array([base + "1.png", base + "2.png"]),
                             "TEXT": invalid_utf8_strings([b"a red cube", b"caf\xe9 \xff ball"])}),
                   d / "invalid_utf8_caption.parquet")
    pq.write_table(pa.table({"URL": [base + "3.png"] * 4, "TEXT": ["a green cone"] * 4}), d / "all_duplicates.parquet")
    pq.write_table(pa.table({"URL": [base + "1.png", base + "2.png", base + "1.png"], "TEXT": ["a red cube", "a blue ball", "a cube"]}),
                   d / "repeated_across_shards.parquet")
    (d / "not_an_image.txt").write_text("hello")
    (d / "broken.jpg").write_bytes(png()[:40])
    (d / "empty_checkpoint").mkdir()
    (d / "not_json.json").write_text("{")
    (d / "truth_corrupt.parquet").write_bytes(b"not parquet")
    (d / "a_file").write_text("x")
    (d / "one.png").write_bytes(png())
    (d / "no_image_column.jsonl").write_text('{"image_id": 1, "captions": ["a cube"]}\n')
    (d / "one_image.jsonl").write_text(json.dumps({"image_id": 1, "image_path": str(d / "one.png"),
                                                   "captions": ["a red cube"]}) + "\n")

    # Runs: images with one unreadable image; a curated run to train on and export.
    commit_image_shards(RunStore(str(root), "images"), {"s0": 3}, corrupt={"s0": (1,)})
    truncated = RunStore(str(root), "truncated")  # a committed images shard whose file was cut short later
    commit_image_shards(truncated, {"s0": 3})
    shard = root / "runs" / "truncated" / "images" / "s0.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    curated = RunStore(str(root), "curated")
    rows = [dict(sample_id=f"s0/{i}", caption_id=f"s0/{i}#web", image=png(), image_format="png", caption="a red cube",
                 caption_source="web", clip_score=0.3, itm_score=0.9, rank=0, url=f"{base}{i}.png", width=32, height=32,
                 run_id="curated", original_width=32, original_height=32, license=None, punsafe=0.0, pwatermark=0.0,
                 similarity=0.3, provenance="{}") for i in range(2)]
    curated.commit_shard("select", "s0", "test", outputs=curated_outputs(rows), counts=ShardCounts(rows_in=2, kept=2))
    yield w
    server.shutdown()


# -- the table ------------------------------------------------------------------------------------
@dataclass
class Row:
    id: str
    argv: Callable[[World], list[str]]
    expect: tuple[str, ...] = ()  # substrings of the one error line: what is wrong (file/row/option) and the fix
    accepted: dict | None = None  # a bad row in good input: {"run": ..., "stage": ..., "reason": ..., "kept": n}
    ray: bool = False
    keeps: str | None = None  # a run the failed command may write: its rows rejected with reasons, no output


def R(w: World) -> list[str]:  # noqa: N802 - short, it is on every row
    return ["--root", str(w.root)]


TABLE = [
    # ingest: the source file
    Row("ingest-wrong-columns", lambda w: ["ingest", "--source", w.p("wrong_columns.parquet"), *R(w), "--run", "x"],
        ("wrong_columns.parquet", "no URL column 'URL'", "['image_url', 'caption']", "--url-col")),
    Row("ingest-wrong-type-parquet", lambda w: ["ingest", "--source", w.p("wrong_type.parquet"), *R(w), "--run", "x"],
        ("wrong_type.parquet", "column 'URL'", "list<", "Fix the column")),
    Row("ingest-wrong-values-parquet", lambda w: ["ingest", "--source", w.p("wrong_values.parquet"), *R(w), "--run", "x"],
        ("wrong_values.parquet", "column 'WIDTH'", "'wide'", "first at row 1", "Fix the column")),
    Row("ingest-wrong-type-csv", lambda w: ["ingest", "--source", w.p("wrong_type.csv"), *R(w), "--run", "x"],
        ("wrong_type.csv", "column 'WIDTH'", "int64", "Fix the column")),
    Row("ingest-empty-file", lambda w: ["ingest", "--source", w.p("empty.parquet"), *R(w), "--run", "x"],
        ("empty.parquet has no rows", "is it the right file")),
    Row("ingest-zero-byte-file", lambda w: ["ingest", "--source", w.p("zero_bytes.parquet"), *R(w), "--run", "x"],
        ("zero_bytes.parquet", "not a readable Parquet file", "Fix or remove the file")),
    Row("ingest-corrupt-parquet", lambda w: ["ingest", "--source", w.p("corrupt.parquet"), *R(w), "--run", "x"],
        ("corrupt.parquet", "not a readable Parquet file", "Fix or remove the file")),
    Row("ingest-corrupt-jsonl", lambda w: ["ingest", "--source", w.p("corrupt.jsonl"), *R(w), "--run", "x"],
        ("corrupt.jsonl", "cannot read this source file", "Fix or remove the file")),
    Row("ingest-invalid-utf8-csv", lambda w: ["ingest", "--source", w.p("invalid_utf8.csv"), *R(w), "--run", "x"],
        ("invalid_utf8.csv", "column 'TEXT'", "Invalid UTF8", "first at row 1", "Fix the column")),
    Row("ingest-missing-source", lambda w: ["ingest", "--source", w.p("nope.parquet"), *R(w), "--run", "x"],
        ("--source", "nope.parquet", "no such file or folder")),
    Row("ingest-empty-folder", lambda w: ["ingest", "--source", w.p("empty_folder"), *R(w), "--run", "x"],
        ("--source", "empty_folder", "holds no .parquet")),
    Row("ingest-bad-shard-size", lambda w: ["ingest", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                             "--shard-size", "0"], ("--shard-size must be >= 1",)),
    Row("ingest-bad-encode-format", lambda w: ["ingest", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                                "--encode-format", "bmp"], ("--encode-format 'bmp'", "jpg, png, webp")),
    Row("ingest-bad-resize-mode", lambda w: ["ingest", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                              "--resize-mode", "squash"], ("--resize-mode", "squash", "border")),
    Row("ingest-not-a-number", lambda w: ["ingest", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                           "--timeout", "soon"], ("--timeout", "'soon' is not a valid float")),
    Row("ingest-missing-blocklist", lambda w: ["ingest", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                                "--url-blocklist", w.p("nope.txt")], ("--url-blocklist", "nope.txt", "does not exist", "check the path")),
    Row("ingest-from-missing-run", lambda w: ["ingest", "--from-run", "ghost", *R(w), "--run", "x"],
        ("--from-run ghost", "has no finished ingest shards")),
    Row("ingest-source-and-from-run", lambda w: ["ingest", "--source", w.p("good.parquet"), "--from-run", "images",
                                                  *R(w), "--run", "x"], ("either --source", "or --from-run")),
    # caption
    Row("caption-missing-run", lambda w: ["caption", *R(w), "--run", "ghost", "--captioner", "none"],
        ("run 'ghost'", "no images/ shards", "capfilt ingest")),
    Row("caption-missing-captioner", lambda w: ["caption", *R(w), "--run", "images", "--captioner", w.p("no_model")],
        ("no_model", "save_pretrained")),
    Row("caption-bad-top-p", lambda w: ["caption", *R(w), "--run", "images", "--captioner", "none", "--top-p", "2"],
        ("--top-p must be in (0, 1]", "got 2.0")),
    Row("caption-unreadable-image", lambda w: ["caption", *R(w), "--run", "images", "--captioner", "none"],
        accepted={"run": "images", "stage": "caption", "reason": "undecodable_image", "sample_id": "s0/1",
                  "message": "could not be decoded", "line": "3 images = 2 captioned + 0 dropped + 1 failed (undecodable_image 1)"}),
    Row("caption-truncated-images-shard", lambda w: ["caption", *R(w), "--run", "truncated", "--captioner", "none"],
        ("runs/truncated/images/s0.parquet", "not a readable Parquet file", "Re-create it or remove it")),
    # filter
    Row("filter-missing-run", lambda w: ["filter", *R(w), "--run", "ghost", "--clip", "ViT-B-32", "--policy",
                                         "clip-threshold"], ("run 'ghost'", "no captioned shards", "capfilt caption")),
    Row("filter-unknown-policy", lambda w: ["filter", *R(w), "--run", "images", "--clip", "ViT-B-32", "--policy",
                                            "best"], ("--policy", "best", "choose from")),
    Row("filter-unknown-clip", lambda w: ["filter", *R(w), "--run", "images", "--clip", "ViT-Q-99", "--policy",
                                          "clip-threshold"], ("ViT-Q-99", "not an open_clip model name")),
    Row("filter-bad-top-k", lambda w: ["filter", *R(w), "--run", "images", "--clip", "ViT-B-32", "--top-k", "0"],
        ("--top-k must be >= 1", "got 0")),
    # train
    Row("train-missing-run", lambda w: ["train", "stage1", *R(w), "--run", "ghost", "--vision", "open_clip:x",
                                        "--out", w.p("out-train1")], ("run 'ghost'", "no curated/ data", "capfilt filter")),
    Row("train-not-json-model-config", lambda w: ["train", "stage1", *R(w), "--run", "curated", "--vision",
                                                  "open_clip:x", "--out", w.p("out-train2"), "--model-config", "{layers: 2"],
        ("--model-config", "not JSON")),
    Row("train-bad-steps", lambda w: ["train", "stage1", *R(w), "--run", "curated", "--vision", "open_clip:x",
                                      "--out", w.p("out-train3"), "--steps", "0"], ("--steps must be >= 1", "got 0")),
    Row("train-missing-stage1-checkpoint", lambda w: ["train", "stage2", *R(w), "--run", "curated", "--stage1",
                                                      w.p("no_ckpt"), "--llm", "x", "--out", w.p("out-train4")],
        ("--stage1", "no_ckpt", "does not exist")),
    Row("train-empty-stage1-checkpoint", lambda w: ["train", "stage2", *R(w), "--run", "curated", "--stage1",
                                                    w.p("empty_checkpoint"), "--llm", "x", "--out", w.p("out-train5")],
        ("--stage1", "empty_checkpoint", "no Stage 1 Q-Former", "capfilt train stage1 --out")),
    # finetune and toy
    Row("finetune-missing-annotated", lambda w: ["finetune", "filter", "--annotated", w.p("nope.jsonl"), "--out",
                                                 w.p("out-ft1"), "--stage1", w.p("empty_checkpoint")],
        ("--annotated", "nope.jsonl", "no such file or folder", "give the annotated Parquet/JSONL")),
    Row("finetune-annotated-no-image-column", lambda w: ["finetune", "captioner", "--annotated",
                                                         w.p("no_image_column.jsonl"), "--out", w.p("out-ft2"),
                                                         "--stage2", w.p("empty_checkpoint")],
        ("no_image_column.jsonl", "no image column", "found: captions, image_id", "image_path")),
    Row("finetune-holdout-leaves-nothing", lambda w: ["finetune", "filter", "--annotated", w.p("one_image.jsonl"),
                                                      "--out", w.p("out-ft3"), "--stage1", w.p("empty_checkpoint")],
        ("--holdout-fraction 0.2 of 1 images", "lower it or give a larger annotated set")),
    Row("toy-missing-run", lambda w: ["toy", "pretrain", *R(w), "--run", "ghost", "--out", w.p("out-toy")],
        ("run 'ghost'", "no images/", "capfilt ingest")),
    # generate
    Row("generate-missing-checkpoint", lambda w: ["generate", "--stage2", w.p("no_ckpt"),
                                                  w.p("broken.jpg")], ("--stage2", "no_ckpt", "no such folder", "capfilt train stage2 --out")),
    Row("generate-empty-checkpoint", lambda w: ["generate", "--stage2", w.p("empty_checkpoint"),
                                                w.p("broken.jpg")], ("empty_checkpoint", "no Stage 2 model", "capfilt train stage2 --out")),
    Row("generate-missing-image", lambda w: ["generate", "--stage2", w.p("empty_checkpoint"),
                                             w.p("no.jpg")], ("no.jpg", "does not exist")),
    Row("generate-bad-top-p", lambda w: ["generate", "--stage2", w.p("empty_checkpoint"),
                                         w.p("broken.jpg"), "--top-p", "0"], ("--top-p must be in (0, 1]",)),
    # eval
    Row("eval-nothing-to-evaluate", lambda w: ["eval", *R(w), "--run", "curated", "--out", w.p("out-eval")],
        ("nothing to evaluate", "--stage1", "--captioner", "--truth")),
    Row("eval-missing-run", lambda w: ["eval", *R(w), "--run", "ghost", "--captioner", "none", "--out",
                                       w.p("out-eval")], ("run 'ghost'", "run ingest/filter first")),
    Row("eval-corrupt-truth", lambda w: ["eval", *R(w), "--run", "curated", "--truth", w.p("truth_corrupt.parquet"),
                                         "--out", w.p("out-eval")], ("--truth", "truth_corrupt.parquet", "not a readable Parquet file",
                                                                           "ground_truth.parquet")),
    Row("eval-bad-max-images", lambda w: ["eval", *R(w), "--run", "curated", "--max-images", "0",
                                          "--out", w.p("out-eval")], ("--max-images", "got --max-images 0")),
    # export
    Row("export-missing-run", lambda w: ["export", "webdataset", *R(w), "--run", "ghost", "--out", w.p("out-wds1")],
        ("run 'ghost'", "no curated/ shards", "capfilt filter")),
    Row("export-bad-shard-size", lambda w: ["export", "webdataset", *R(w), "--run", "curated", "--out",
                                            w.p("out-wds2"), "--shard-size", "0"], ("--shard-size must be >= 1", "got 0")),
    Row("export-out-is-a-file", lambda w: ["export", "webdataset", *R(w), "--run", "curated", "--out", w.p("a_file")],
        ("--out", "a_file", "is a file", "choose a folder")),
    # bootstrap (the flow) and curate: every stage's options are checked before any work
    Row("bootstrap-unknown-set-field", lambda w: ["bootstrap", "--source", w.p("good.parquet"), *R(w), "--set",
                                                  "stage1.stepz=5"], ("stage train stage1", "unknown field 'stepz' (did you mean 'steps'?)")),
    Row("bootstrap-unknown-set-stage", lambda w: ["bootstrap", "--source", w.p("good.parquet"), *R(w), "--set",
                                                  "stage9.steps=5"], ("--set", "stage9.steps=5", "STAGE.OPTION=VALUE")),
    Row("bootstrap-bad-set-value", lambda w: ["bootstrap", "--source", w.p("good.parquet"), *R(w), "--set",
                                              "filter.top-k=0"], ("stage filter", "--top-k must be >= 1")),
    Row("bootstrap-missing-source", lambda w: ["bootstrap", "--source", w.p("nope.parquet"), *R(w)],
        ("stage ingest", "--source", "nope.parquet", "no such file or folder")),
    Row("bootstrap-bad-rounds", lambda w: ["bootstrap", "--source", w.p("good.parquet"), *R(w), "--rounds", "-1"],
        ("rounds", "greater than or equal to 0")),
    Row("curate-bad-num-captions", lambda w: ["curate", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                              "--captioner", "none", "--clip", "ViT-B-32", "--num-captions", "0"],
        ("stage caption", "--num-captions must be >= 1")),
    Row("curate-annotated-without-itm", lambda w: ["curate", "--source", w.p("good.parquet"), *R(w), "--run", "x",
                                                   "--captioner", "none", "--clip", "ViT-B-32", "--annotated",
                                                   w.p("good.parquet")], ("--annotated", "give --itm")),
    Row("curate-annotated-with-another-policy", lambda w: ["curate", "--source", w.p("good.parquet"), *R(w), "--run",
                                                           "x", "--captioner", "none", "--clip", "ViT-B-32", "--itm", "m",
                                                           "--policy", "blip2", "--annotated", w.p("good.parquet")],
        ("--policy blip2 does not use it", "calibrated")),
    Row("curate-nothing-kept", lambda w: ["curate", "--source", w.p("good.parquet"), *R(w), "--run", "nk",
                                          "--captioner", "none", "--clip", "ViT-B-32"],
        ("ingest nk: nothing of 2 rows kept", "2 of 2 private_address", "pass --allow-private-addresses"),
        ray=True, keeps="nk"),
    # bad rows inside a good source: dropped with a reason, the run keeps the good row
    Row("ingest-megabyte-caption", lambda w: ["ingest", "--source", w.p("megabyte_caption.parquet"), *R(w), "--run",
                                              "mb", "--allow-private-addresses", "--no-progress"],
        accepted={"run": "mb", "stage": "ingest", "reason": "bad_caption", "sample_id": "megabyte_caption/1",
                  "message": "caption is 1,100,000 bytes, more than 65,536",
                  "line": "2 rows in = 1 kept + 1 dropped (bad_caption 1) + 0 failed"}, ray=True),
    Row("ingest-nul-bytes-caption", lambda w: ["ingest", "--source", w.p("nul_caption.parquet"), *R(w), "--run",
                                               "nul", "--allow-private-addresses", "--no-progress"],
        accepted={"run": "nul", "stage": "ingest", "reason": "bad_caption", "sample_id": "nul_caption/1",
                  "message": "caption holds 2 NUL byte(s)", "line": "2 rows in = 1 kept + 1 dropped (bad_caption 1) + 0 failed"},
        ray=True),
    Row("ingest-invalid-utf8-caption", lambda w: ["ingest", "--source", w.p("invalid_utf8_caption.parquet"), *R(w),
                                                  "--run", "utf", "--allow-private-addresses", "--no-progress"],
        accepted={"run": "utf", "stage": "ingest", "reason": "bad_caption", "sample_id": "invalid_utf8_caption/1",
                  "message": "caption is not valid UTF-8 (byte 3",
                  "line": "2 rows in = 1 kept + 1 dropped (bad_caption 1) + 0 failed"}, ray=True),
    Row("ingest-all-urls-duplicates", lambda w: ["ingest", "--source", w.p("all_duplicates.parquet"), *R(w), "--run",
                                                 "dup", "--allow-private-addresses", "--no-progress"],
        accepted={"run": "dup", "stage": "ingest", "reason": "duplicate_url", "sample_id": "all_duplicates/1",
                  "message": "the same URL as an earlier row", "duplicate_of": "all_duplicates/0",
                  "rejected": 3, "line": "4 rows in = 1 kept + 3 dropped (duplicate_url 3) + 0 failed"}, ray=True),
    # --shard-size 2: the repeat is in the second shard, downloaded by another Ray task
    Row("ingest-url-repeated-in-a-later-shard", lambda w: ["ingest", "--source", w.p("repeated_across_shards.parquet"), *R(w),
                                                           "--run", "dup2", "--shard-size", "2", "--allow-private-addresses",
                                                           "--no-progress"],
        accepted={"run": "dup2", "stage": "ingest", "reason": "duplicate_url", "sample_id": "repeated_across_shards/2",
                  "message": "the same URL as repeated_across_shards/0, an earlier row of the source in another shard",
                  "duplicate_of": "repeated_across_shards/0", "line": "3 rows in = 2 kept + 1 dropped (duplicate_url 1) + 0 failed"}, ray=True),
]


def files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")} if path.exists() else {}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("row", TABLE, ids=[r.id for r in TABLE])
def test_bad_input(row: Row, world: World, capsys, request):
    if row.ray:
        with capsys.disabled():  # Ray's log handlers must hold the real stderr, not this test's capture
            request.getfixturevalue("ray_local")
    argv = row.argv(world)
    before = files(world.dir)
    code, out, err = run_cli(argv, capsys)  # an unexpected exception (a bug) fails the test with its traceback
    assert "Traceback" not in out + err, (out, err)
    if row.accepted:
        a = row.accepted
        assert code == 0, err
        assert "capfilt: error:" not in err and a["line"] in out, (out, err)
        rejected = RunStore(str(world.root), a["run"]).read_rejected(a["stage"]).to_pylist()
        mine = [r for r in rejected if r["sample_id"] == a["sample_id"]]
        assert len(mine) == 1 and mine[0]["reason"] == a["reason"] and a["message"] in mine[0]["error_message"], mine
        assert mine[0]["outcome"] == ("failed" if a["stage"] == "caption" else "dropped"), mine
        assert mine[0]["duplicate_of"] == a.get("duplicate_of"), mine
        assert len(rejected) == a.get("rejected", 1), rejected
        return
    assert code == 2, (code, out, err)
    errors = [line for line in err.splitlines() if line.startswith("capfilt: error:")]
    assert len(errors) == 1 and err.strip() == errors[0], err
    for part in row.expect:
        assert part in errors[0], (part, errors[0])
    after = files(world.dir)
    if row.keeps:  # what it wrote is every row rejected with its reason, and no image a later stage would read
        run = f"root/runs/{row.keeps}"
        assert not [p for p in after if p.startswith(f"{run}/images/") and p.endswith(".parquet")
                    and pq.read_metadata(world.dir / p).num_rows], after
        assert RunStore(str(world.root), row.keeps).read_rejected("ingest").num_rows == 2
        after = {p: n for p, n in after.items() if p != run and not p.startswith(f"{run}/")}
    assert after == before, sorted(set(after) ^ set(before))  # nothing written, nothing a rerun would trust
