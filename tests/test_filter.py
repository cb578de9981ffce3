"""Filter: CLIP/ITM scoring, policies with reasons, faiss dedup, curated Parquet, report."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.errors import ConfigError
from model.toy.world import WorldConfig, make_world
from pipeline.dedup import DedupConfig, brute_force_duplicates, find_duplicates, semantic_duplicates
from pipeline.run_store import RunStore, ShardCounts
from pipeline.select import SelectConfig, clip_cut, select_pairs
from schemas import CAPTIONS, CURATED, IMAGES, SCORES
from tests.caption_helpers import commit_image_shards

# -- policies on crafted scores --------------------------------------------------------------------


def crafted(rows):
    """Scores rows: (sample_id, caption_id, source, caption, clip, itm, degenerate)."""
    keys = ["sample_id", "caption_id", "caption_source", "caption", "clip_score", "itm_score", "degenerate"]
    return SCORES.conform(pa.Table.from_pylist([dict(zip(keys, r)) for r in rows]))


SCORES_A = crafted([
    ("a", "a#web", "web", "a red circle", 0.30, 0.90, None),
    ("a", "a#syn0", "synthetic", "a red circle left", 0.40, 0.80, None),
    ("a", "a#syn1", "synthetic", "a blue square", 0.10, 0.20, None),
    ("a", "a#syn2", "synthetic", "", 0.50, 0.95, "empty"),
    ("b", "b#web", "web", "IMG_0042.jpg", 0.05, 0.10, None),
    ("b", "b#syn0", "synthetic", "circle circle circle circle", 0.35, 0.60, "repeated_token"),
    ("c", "c#web", "web", "a green cross", 0.45, 0.70, None),
])
IMAGES_A = pa.Table.from_pylist([
    {"sample_id": "a", "width": 64, "height": 64, "punsafe": 0.01, "pwatermark": 0.9},
    {"sample_id": "b", "width": 64, "height": 64, "punsafe": 0.01, "pwatermark": 0.0},
    {"sample_id": "c", "width": 10, "height": 64, "punsafe": 0.9, "pwatermark": 0.0},
])


def decided(kept, dropped):
    return {r["caption_id"]: ("kept", r["rank"]) for r in kept} | {r["caption_id"]: r["reason"] for r in dropped}


def test_every_caption_is_decided_once():
    for policies in (("blip",), ("blip2",), ("clip-threshold",), ("clip-top-fraction",), ("blip", "blip2")):
        kept, dropped = select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=policies), top_fraction_cut=0.3)
        ids = [r["caption_id"] for r in kept + dropped]
        assert sorted(ids) == sorted(SCORES_A.column("caption_id").to_pylist()), policies


def test_blip_policy_keeps_itm_matches():
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("blip",), itm_threshold=0.5)))
    assert out["a#web"] == ("kept", 1) and out["a#syn0"] == ("kept", 0)
    assert out["a#syn1"] == "itm_below_threshold"
    assert out["a#syn2"] == "empty_caption"
    assert out["b#syn0"] == "degenerate_repeated_token"
    assert out["b#web"] == "itm_below_threshold"


def test_blip2_policy_keeps_top_k_by_clip():
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("blip2",), top_k=1)))
    assert out["a#syn0"] == ("kept", 0) and out["a#web"] == "not_top_k" and out["a#syn1"] == "not_top_k"
    assert out["b#web"] == ("kept", 0)  # the only non-degenerate caption of b
    by_itm = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("blip2",), top_k=1, rank_by="itm")))
    assert by_itm["a#web"] == ("kept", 0) and by_itm["a#syn0"] == "not_top_k"
    with pytest.raises(ConfigError, match="--rank-by"):
        SelectConfig(rank_by="bleu")


def test_datacomp_policies_and_combination():
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("clip-threshold",), clip_threshold=0.25)))
    assert out["a#web"][0] == "kept" and out["a#syn1"] == "clip_below_threshold"
    cut = clip_cut(SCORES_A.column("clip_score").to_pylist(), 0.5)
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("clip-top-fraction",), clip_top_fraction=0.5), cut))
    assert out["a#syn0"][0] == "kept" and out["a#web"] == "clip_not_top_fraction"
    combined = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("blip", "blip2"), top_k=1)))
    assert combined["a#syn0"] == ("kept", 0) and combined["a#web"] == "not_top_k"


def test_metadata_filters_and_duplicates():
    cfg = SelectConfig(min_image_size=32, max_pwatermark=0.5, max_punsafe=0.5)
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {"b": "a"}, cfg))
    assert out["a#web"] == "watermarked"
    assert out["b#web"] == "duplicate"
    assert out["c#web"] == "image_too_small"


def test_policy_none_keeps_every_checked_caption_and_caption_sources_restrict_them():
    out = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("none",))))
    assert out["a#web"][0] == out["a#syn0"][0] == out["a#syn1"][0] == out["b#web"][0] == "kept"  # no model judges
    assert out["a#syn2"] == "empty_caption" and out["b#syn0"] == "degenerate_repeated_token"  # the checks still do
    web = decided(*select_pairs(SCORES_A, IMAGES_A, {}, SelectConfig(policies=("blip",), caption_sources=("web",))))
    assert web["a#syn0"] == web["a#syn1"] == "caption_source_excluded" and web["a#web"] == ("kept", 0)
    assert web["b#web"] == "itm_below_threshold"  # the policy still judges the web captions
    with pytest.raises(ConfigError, match="combines with no other"):
        SelectConfig(policies=("none", "blip2"))
    with pytest.raises(ConfigError, match="--caption-sources"):
        SelectConfig(caption_sources=("alt",))


def test_bad_select_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="choose from"):
        SelectConfig(policies=("blip3",))
    with pytest.raises(ConfigError, match="--top-k"):
        SelectConfig(top_k=0)


# -- dedup ------------------------------------------------------------------------------------------


def test_dedup_finds_the_worlds_exact_duplicates(tmp_path):
    world = make_world(tmp_path, WorldConfig(images=30, seed=4, duplicates=5, bad_url_kinds=(), huge_side=100))
    truth = pq.read_table(world["ground_truth"]).to_pylist()
    ids, digests = [], []
    for row in truth:  # what ingest records: the sha256 of the bytes each URL serves
        path = row["url"].split("/", 3)[3]
        name = path.rsplit("/", 1)[1] if path.startswith("img/") else f"{row['image_index']:06d}.jpg"
        ids.append(f"part-00000/{row['source_row']}")
        digests.append(hashlib.sha256((tmp_path / "files" / name).read_bytes()).hexdigest())
    table = find_duplicates(ids, digests, None, DedupConfig(semantic=False))
    assert table.num_rows == 5 and set(table.column("kind").to_pylist()) == {"exact"}
    by_url = {f"part-00000/{r['source_row']}": r for r in truth}
    for row in table.to_pylist():
        pair = {by_url[row["sample_id"]]["url"], by_url[row["duplicate_of"]]["url"]}
        dup = next(r for r in truth if r["url"] in pair and r["kind"] == "duplicate")
        assert pair == {dup["url"], dup["duplicate_of"]}


def test_semantic_dedup_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    near = base[:40] + 0.01 * rng.normal(size=(40, 16)).astype(np.float32)
    x = np.concatenate([base, near])
    ids = [f"s{i:04d}" for i in range(len(x))]
    expected = brute_force_duplicates(ids, x, eps=0.01)
    assert len(expected) == 40
    found, sims = semantic_duplicates(ids, x, DedupConfig(eps=0.01, cluster_size=50))
    assert found == expected  # every near-duplicate lands in its original's cluster here
    assert all(s > 0.99 for s in sims.values())


# -- the stage end to end ---------------------------------------------------------------------------


def commit_caption_shards(store, shards):
    """Per image: the web caption, a true synthetic one, a wrong one and an empty (degenerate) one."""
    for shard in shards:
        images = store.read_shard("images", shard, IMAGES)
        rows = []
        for sid, caption in zip(images.column("sample_id").to_pylist(), images.column("caption").to_pylist()):
            rows.append({"sample_id": sid, "caption_id": f"{sid}#web", "caption_source": "web", "caption_index": 0, "caption": caption})
            rows.append({"sample_id": sid, "caption_id": f"{sid}#syn0", "caption_source": "synthetic", "caption_index": 0,
                         "caption": caption, "captioner": "t"})
            rows.append({"sample_id": sid, "caption_id": f"{sid}#syn1", "caption_source": "synthetic", "caption_index": 1,
                         "caption": "a tiny blue thing somewhere", "captioner": "t"})
            rows.append({"sample_id": sid, "caption_id": f"{sid}#syn2", "caption_source": "synthetic", "caption_index": 2,
                         "caption": "", "captioner": "t", "degenerate": "empty"})
        store.commit_shard("caption", shard, "test-caption", outputs={"captions": (CAPTIONS, pa.Table.from_pylist(rows))},
                           counts=ShardCounts(rows_in=images.num_rows, kept=images.num_rows, rows_out=len(rows)))


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from model.scorers import save_random_clip, save_random_itm

    folder = tmp_path_factory.mktemp("scorers")
    config, name, checkpoint = save_random_clip(str(folder / "clip"))
    itm = save_random_itm(str(folder / "itm"))
    return {"clip": name, "clip_pretrained": checkpoint, "clip_config": config, "itm": itm}


def test_tiny_open_clip_loads_through_the_named_path(tiny_scorers, tmp_path):
    from PIL import Image

    from model.scorers import load_clip, load_itm

    clip = load_clip(tiny_scorers["clip"], tiny_scorers["clip_pretrained"])
    emb = clip.embed_images([Image.new("RGB", (40, 40), "red")])
    assert emb.shape == (1, 32) and abs(np.linalg.norm(emb) - 1) < 1e-5
    assert load_itm(tiny_scorers["itm"]).match_probability([Image.new("RGB", (40, 40))], ["a"]).shape == (1,)
    # built without random init (the checkpoint overwrites it): every weight is the checkpoint's,
    # and a checkpoint that lacks one is an error, never a random weight
    import torch

    saved = torch.load(tiny_scorers["clip_pretrained"])["state_dict"]
    assert all(torch.equal(clip.model.state_dict()[k].float(), v.float()) for k, v in saved.items())
    partial = tmp_path / "partial.pt"
    torch.save({"state_dict": {k: v for k, v in saved.items() if k != "positional_embedding"}}, partial)
    with pytest.raises(ConfigError, match="cannot load"):
        load_clip(tiny_scorers["clip"], str(partial))
    with pytest.raises(ConfigError, match="not an open_clip model name"):
        load_clip("no-such-model")
    with pytest.raises(ConfigError, match="no model config found"):
        load_itm("/nonexistent/folder")


def test_a_batch_preprocesses_each_image_once_for_itm_and_scores_as_pair_by_pair(tiny_scorers, tmp_path):
    from model.scorers import load_clip, load_itm
    from pipeline.caption import decode_image
    from pipeline.score import score_pairs, shard_pairs

    store = RunStore(str(tmp_path), "f")
    commit_image_shards(store, {"s0": 3}, corrupt={"s0": (1,)})
    commit_caption_shards(store, ["s0"])
    pairs = shard_pairs(store.read_shard("images", "s0", IMAGES), store.read_shard("captions", "s0", CAPTIONS))
    clip, itm = load_clip(tiny_scorers["clip"], tiny_scorers["clip_pretrained"]), load_itm(tiny_scorers["itm"])
    processor, seen = itm.processor, []

    def counting(images, **kwargs):
        seen.append(len(images))
        return processor(images=images, **kwargs)

    itm.processor = counting
    scored = score_pairs(pairs, clip, itm)
    itm.processor = processor
    assert seen == [2]  # 8 decodable pairs of 2 images: each image's pixels made once
    ok = [i for i, e in enumerate(scored.column("error").to_pylist()) if e is None]
    assert len(ok) == 8
    blobs, texts = pairs.column("image").to_pylist(), pairs.column("caption").to_pylist()
    alone = itm.match_probability([decode_image(blobs[i]) for i in ok], [texts[i] or "" for i in ok])
    np.testing.assert_allclose(np.array(scored.column("itm_score").to_pylist())[ok].astype(np.float32), alone, atol=1e-6)


def test_a_small_local_run_scores_in_the_driver_process_and_writes_what_ray_actors_write(ray_local, tiny_scorers, tmp_path):
    from pipeline import score
    from pipeline.score import ScoreConfig

    runs, summaries = {}, {}
    for executor in ("ray", "auto"):
        runs[executor] = store = RunStore(str(tmp_path / executor), "f")
        commit_image_shards(store, {"s0": 3, "s1": 2}, corrupt={"s1": (1,)})
        commit_caption_shards(store, ["s0", "s1"])
        summaries[executor] = score.run(store, ScoreConfig(
            clip=tiny_scorers["clip"], clip_pretrained=tiny_scorers["clip_pretrained"], clip_config=tiny_scorers["clip_config"],
            itm=tiny_scorers["itm"], batch_size=4, executor=executor))

    assert summaries["ray"].executor == "ray" and "driver process" not in summaries["ray"].line()
    assert summaries["auto"].executor == "local"  # 5 batches: far below the small-run bound
    assert "ran in the driver process, not on Ray actors (small run: 5 batch(es)" in summaries["auto"].line()
    for summary in summaries.values():
        assert (summary.shards_done, summary.rows_in, summary.kept, summary.failed) == (2, 20, 16, {"undecodable_image": 4})
    # bit for bit: the same batches through the same models, in a Ray actor or in this process
    assert runs["auto"].read("scores", SCORES).equals(runs["ray"].read("scores", SCORES))
    assert runs["auto"].read_rejected("score").equals(runs["ray"].read_rejected("score"))


@pytest.mark.slow
def test_filter_command_end_to_end(ray_local, tiny_scorers, tmp_path, capsys):
    import duckdb

    from capfilt.cli import cli

    root = str(tmp_path)
    store = RunStore(root, "f")
    commit_image_shards(store, {"s0": 6, "s1": 5}, corrupt={"s1": (2,)})
    commit_caption_shards(store, ["s0", "s1"])
    argv = ["filter", "--root", root, "--run", "f", "--clip", tiny_scorers["clip"], "--clip-config", tiny_scorers["clip_config"],
            "--clip-pretrained", tiny_scorers["clip_pretrained"], "--itm", tiny_scorers["itm"], "--policy", "blip2", "--top-k", "2",
            "--dedup-eps", "0.0"]
    result = cli.main(args=[*argv, "--executor", "local"], prog_name="capfilt", standalone_mode=False)
    assert "ran in the driver process, not on Ray actors (executor local)" in capsys.readouterr().out
    captions = store.read("captions", CAPTIONS).num_rows
    scored = store.read("scores", SCORES).num_rows
    failed = store.read_rejected("score").num_rows
    assert scored + failed == captions == 44 and failed == 4  # the corrupt image's 4 pairs
    curated = store.read("curated", CURATED)
    dropped = store.read_rejected("select")
    assert curated.num_rows + dropped.num_rows == scored  # every scored caption decided once
    assert set(dropped.column("reason").to_pylist()) == {"empty_caption", "not_top_k"}
    assert curated.num_rows == 2 * 10  # top-2 of each decodable image
    for record in store.records():
        assert record.rows_in == record.kept + record.rejected + record.failed
    # Curated Parquet reads with pyarrow, pandas, DuckDB.
    curated_dir = f"{root}/runs/f/curated"
    assert pq.read_table(curated_dir).to_pandas().shape[0] == curated.num_rows
    count = duckdb.sql(f"select count(*) from read_parquet('{curated_dir}/*.parquet') where rank < 2").fetchall()[0][0]
    assert count == curated.num_rows
    report = tmp_path / "runs" / "f" / "report"
    for name in ("scores_hist.png", "filter.html", "filter_reasons.json", "style.css"):
        assert (report / name).stat().st_size > 0
    assert (report / "samples").is_dir() and any((report / "samples").iterdir())
    # Curated rows keep the source's metadata; each image's bytes are stored once.
    assert {"license", "punsafe", "pwatermark", "similarity", "original_width"} <= set(curated.column_names)
    assert "image" not in curated.column_names
    images = duckdb.sql(f"select count(*), count(distinct sample_id), sum(len(captions)) "
                        f"from read_parquet('{root}/runs/f/curated_images/*.parquet')").fetchall()[0]
    assert images == (10, 10, curated.num_rows)
    assert result.select.rows_in == scored and result.rows_in == captions
    assert result.kept + result.rows_dropped + result.rows_failed == result.rows_in
    # A rerun does no work.
    again = cli.main(args=argv, prog_name="capfilt", standalone_mode=False)
    assert again.score.shards_skipped == 2 and again.select.shards_skipped == 2
    # An ablation arm: the same images, run f's captions and scores taken (nothing scored again),
    # only the selection differs (web captions only, no model judging).
    arm = RunStore(root, "arm")
    commit_image_shards(arm, {"s0": 6, "s1": 5}, corrupt={"s1": (2,)})
    arm_argv = ["filter", "--root", root, "--run", "arm", "--from-run", "f", *argv[5:], "--policy", "none",
                "--caption-sources", "web"]
    taken = cli.main(args=arm_argv, prog_name="capfilt", standalone_mode=False)
    assert taken.score.shards_done == 0 and taken.score.shards_skipped == 2
    assert arm.read("scores", SCORES).equals(store.read("scores", SCORES))
    kept = arm.read("curated", CURATED)
    assert set(kept.column("caption_source").to_pylist()) == {"web"} and kept.num_rows == 10  # every decodable web caption
    reasons = arm.read_rejected("select").column("reason").to_pylist()
    assert kept.num_rows + len(reasons) == scored and set(reasons) == {"caption_source_excluded"}
    # Other images than the run it takes from: refused, naming both.
    other = RunStore(root, "other")
    commit_image_shards(other, {"s0": 3, "s1": 5})
    with pytest.raises(ConfigError, match="shard s0 holds other images"):
        cli.main(args=["filter", "--root", root, "--run", "other", "--from-run", "f", *argv[5:]], prog_name="capfilt",
                 standalone_mode=False)


# -- reports --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_world(tmp_path_factory):
    from tests.report_world import make_bootstrap

    return make_bootstrap(tmp_path_factory.mktemp("reports"))


def test_filter_report_samples_every_outcome_and_shows_missing_scores_as_dashes(report_world):
    import json
    import re

    page = report_world["filter_r0"].read_text()
    # One group per outcome: kept and every drop reason present, not_top_k included.
    assert re.findall(r"<h3>([^<]+) <small>", page) == ["Kept", "Dropped: not_top_k", "Dropped: empty_caption"]
    cards = re.findall(r'<div class="card".*?</div>\s*</div>', page, re.S)
    assert len(cards) == 9 and all(re.search(r'class="tag (web|synthetic)"', c) for c in cards)
    # Round 0 ran no ITM scorer: its ITM is "—", never 0, and there is no empty ITM panel but a note.
    assert all("ITM —" in c for c in cards) and "ITM 0.000" not in page
    assert "No ITM match probability in this run" in page
    assert 'href="style.css"' in page and "file://" not in page and "base64" not in page
    numbers = json.loads((report_world["filter_r0"].parent / "filter_reasons.json").read_text())
    assert numbers["captions"] == 36 and numbers["kept"] == 9 and isinstance(numbers["captions"], int)
    assert set(numbers["dropped_by_reason"]) == {"not_top_k", "empty_caption"}
    # The draw is random but seeded: the same run gives the same samples.
    from pipeline.filter_report import write_filter_report

    write_filter_report(report_world["r0"], samples=3)
    assert report_world["filter_r0"].read_text() == page


def test_bootstrap_report_leads_with_a_verdict_and_deltas(report_world):
    page = report_world["index"].read_text()
    assert page.index('id="verdict"') < page.index('id="comparison"') < page.index("Headline metrics")
    assert "CapFilt did not pay: text-&gt;image R@1 (ITM rerank) 0.250 for capfilt-r1 vs 0.300 for raw-r0 (−0.050)" in page
    assert "7 of 792 were correct" in page and "0.009 (7 / 792)" in page
    assert '<a href="../../r1/report/filter.html">' in page and "file://" not in page
    assert "2,000" in page and "2000.000" not in page  # counts as integers
    # every arm as bars, right under the comparison table
    assert page.index('id="comparison"') < page.index('src="arms.png"') < page.index("Headline metrics")
    assert (report_world["index"].parent / "arms.png").read_bytes()[:4] == b"\x89PNG"
    # the captioner that wrote the synthetic captions, on its own (not an arm: it trained nothing)
    assert page.index("Headline metrics") < page.index('id="captioners"') < page.index("Funnel of")
    row = page[page.index('id="captioners"'):page.index("Funnel of")]
    assert "captioner-of-r1" in row and "600" in row and "0.812" in row and "2.200" in row
    assert "captioner-of-r1" not in page[:page.index("Headline metrics")]
    written = json.loads((report_world["index"].parent / "captioners.json").read_text())
    assert written["captioner-of-r1"]["attributes"]["attribute_accuracy"] == 0.8125


def test_verdict_compares_whatever_arms_are_present():
    from pipeline.bootstrap_report import comparison, verdict

    def ev(r1):
        return {"retrieval": {"itm": {"text_to_image": {"r1": r1}}}}

    arms = {"raw": ev(0.2), "captioner": ev(0.25), "filter": ev(0.22), "capfilt": ev(0.3), "oracle": ev(0.4)}
    chosen = verdict(arms)
    assert chosen["css"] == "paid" and (chosen["baseline"], chosen["candidate"], chosen["oracle"]) == ("raw", "capfilt", "oracle")
    assert "+0.100" in chosen["text"] and "closes 50% of the gap" in chosen["text"]
    table = comparison(arms, chosen)
    assert [r["arm"] for r in table["rows"]] == list(arms) and table["columns"][1:3] == ["Δ vs raw", "Δ vs oracle"]
    assert [c["text"] for c in table["rows"][1]["cells"][:3]] == ["0.250", "+0.050", "−0.150"]
    assert verdict({"raw": {}, "capfilt": {}})["css"] == "none"  # nothing to compare: said, not guessed
