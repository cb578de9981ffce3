"""The clean annotated set and BLIP's finetuning on it: the reader's errors, the seeded split by
image, and the filter (ITC + ITM) and captioner (LM) finetuned from their own parents into
folders that load where Stage 1 / Stage 2 checkpoints load, with lineage."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from stage1_world import IMAGE_SIZE, jpeg, make_clip_vision, make_curated_run, make_tokenizer, scenes
from stage2_world import TINY_QFORMER, make_opt, make_stage1_checkpoint

from capfilt.cli import main as cli_main
from capfilt.errors import ConfigError
from model.toy.scenes import render, true_caption, web_caption
from pipeline.annotated import AnnotatedImage, read_annotated, split_annotated, write_annotated


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on 2 shared cores: a second torch thread only adds contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def annotated_images(n: int, seed: int = 0) -> list[AnnotatedImage]:
    """What `capfilt synth` writes next to a world: separate images, several clean captions each."""
    rng = np.random.default_rng([seed, 5])
    return [AnnotatedImage(f"coco{i:04d}", jpeg(render(attrs, IMAGE_SIZE, rng)),
                           tuple(dict.fromkeys([true_caption(attrs), web_caption(attrs, rng), web_caption(attrs, rng)])))
            for i, attrs in enumerate(scenes(n, seed + 100))]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotated")
    images = annotated_images(40)
    write_annotated(images, str(folder / "annotated.parquet"))
    return {"path": str(folder / "annotated.parquet"), "images": images}


# -- the reader ------------------------------------------------------------------------------------

def test_the_canonical_parquet_reads_back_in_image_id_order(annotated):
    data = read_annotated(annotated["path"])
    assert [im.image_id for im in data.images] == sorted(im.image_id for im in annotated["images"])
    assert data.pairs == sum(len(im.captions) for im in annotated["images"])
    assert data.fingerprint() == read_annotated(str(Path(annotated["path"]).parent)).fingerprint()  # folder = file


def test_jsonl_with_one_caption_per_row_and_image_paths_groups_rows_by_image(tmp_path, annotated):
    lines = []
    for im in annotated["images"][:3]:
        (tmp_path / f"{im.image_id}.jpg").write_bytes(im.image)
        lines += [json.dumps({"image_id": im.image_id, "image_path": f"{im.image_id}.jpg", "caption": c}) for c in im.captions]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")
    data = read_annotated(str(tmp_path / "set.jsonl"))
    assert [(im.image_id, im.captions) for im in data.images] == [(im.image_id, im.captions) for im in annotated["images"][:3]]
    assert data.images[0].image == annotated["images"][0].image


def test_jsonl_may_carry_the_image_as_base64_and_ids_as_numbers(tmp_path, annotated):
    im = annotated["images"][0]
    (tmp_path / "set.jsonl").write_text(json.dumps({"image_id": 7, "image": base64.b64encode(im.image).decode(),
                                                    "captions": list(im.captions)}) + "\n")
    assert read_annotated(str(tmp_path / "set.jsonl")).images[0].image_id == "7"


def _parquet(tmp_path, rows, name="bad.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("rows, expected", [
    ([{"id": "a", "image": b"x", "captions": ["c"]}], "no `image_id` column (found: captions, id, image)"),
    ([{"image_id": "a", "captions": ["c"]}], "no image column"),
    ([{"image_id": "a", "image": b"x", "text": "c"}], "no caption column"),
    ([{"image_id": "a", "image": "GOOD", "captions": []}], "row 0 (image_id a): no caption"),
    ([{"image_id": "a", "image": b"not an image", "captions": ["c"]}], "row 0 (image_id a): the image does not decode"),
    ([{"image_id": "a", "image": "GOOD", "captions": ["c"]}, {"image_id": "a", "image": "OTHER", "captions": ["d"]}],
     "row 1 (image_id a): image_id a already names a different image"),
    ([{"image_id": "a", "image": None, "captions": ["c"]}], "row 0 (image_id a): `image` is empty"),
])
def test_bad_annotated_sets_name_the_file_the_row_and_the_fix(tmp_path, annotated, rows, expected):
    good, other = annotated["images"][0].image, annotated["images"][1].image
    rows = [{k: (good if v == "GOOD" else other if v == "OTHER" else v) for k, v in r.items()} for r in rows]
    path = _parquet(tmp_path, rows)
    with pytest.raises(ConfigError) as err:
        read_annotated(path)
    assert str(err.value).startswith(path) and expected in str(err.value)


def test_unreadable_locations_and_lines_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no such file or folder"):
        read_annotated(str(tmp_path / "missing.parquet"))
    (tmp_path / "set.jsonl").write_text('{"image_id": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"set.jsonl line 2: not JSON"):
        read_annotated(str(tmp_path / "set.jsonl"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["finetune", "filter", "--annotated", str(tmp_path / "set.jsonl"), "--stage1", "x", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("capfilt: error: ") and "set.jsonl line 2: not JSON" in err and len(err.splitlines()) == 1


def test_the_split_is_by_image_seeded_and_independent_of_row_order(annotated):
    images = annotated["images"]
    split = split_annotated(images, 0.2, seed=3)
    assert len(split.calibration) == 8 and len(split.finetune) == 32
    assert not {i.image_id for i in split.calibration} & {i.image_id for i in split.finetune}
    again = split_annotated(list(reversed(images)), 0.2, seed=3)
    assert {i.image_id for i in again.calibration} == {i.image_id for i in split.calibration}
    assert {i.image_id for i in split_annotated(images, 0.2, seed=4).calibration} != {i.image_id for i in split.calibration}
    with pytest.raises(ConfigError, match="--holdout-fraction must be in"):
        split_annotated(images, 1.0)
    with pytest.raises(ConfigError, match="leaves none to finetune on"):
        split_annotated(images[:1], 0.5)


# -- finetuning --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parents(tmp_path_factory, annotated):
    """An untrained Stage 1 checkpoint (its Q-Former) and a Stage 2 checkpoint trained 2 steps on it."""
    from model.stage2 import Stage2Config, train

    base = tmp_path_factory.mktemp("parents")
    vision = make_clip_vision(base / "clip")
    stage1 = make_stage1_checkpoint(base / "stage1", vision, make_tokenizer(base / "tok"))
    make_curated_run(base / "data", "r1", images=16, seed=0)
    stage2 = base / "stage2"
    train(Stage2Config(root=str(base / "data"), run="r1", stage1=str(stage1), llm=make_opt(base / "opt", pretrain_steps=20),
                       out=str(stage2), steps=2, batch_size=8, warmup_steps=1, lr=1e-3, min_lr=1e-4, augment=False,
                       log_every=1, checkpoint_every=2, progress=False, device="cpu"))
    return {"stage1": str(stage1), "stage2": str(stage2), "vision": vision, "data": str(base / "data"),
            "tokenizer": str(base / "tok")}


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_finetuned_filter_learns_loads_as_itm_and_is_calibrated_with_lineage(annotated, parents, tmp_path, capsys):
    from model.scorers import load_itm
    from model.stage1_inference import Stage1Scorer
    from pipeline.calibrate import load_calibration

    from model.scorers import save_random_clip

    out = tmp_path / "filter"
    clip_config, clip_name, clip_checkpoint = save_random_clip(str(tmp_path / "clip"))
    cli_main(["finetune", "filter", "--annotated", annotated["path"], "--stage1", parents["stage1"], "--out", str(out),
              "--steps", "40", "--lr", "1e-3", "--batch-size", "8", "--holdout-fraction", "0.25",
              "--target-precision", "0.5", "--device", "cpu", "--clip", clip_name, "--clip-pretrained", clip_checkpoint,
              "--clip-config", clip_config])
    printed = capsys.readouterr().out
    assert "finetuned filter: 40 steps" in printed and "calibrated: keep " in printed

    log = metrics(out)
    assert all(r["itg"] >= 0 for r in log) and all(abs(r["loss"] - r["itc"] - r["itm"]) < 1e-4 for r in log)  # ITG off
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < first - 0.1, (first, last)

    scorer = load_itm(str(out), device="cpu")  # what `capfilt filter --itm DIR` does
    assert isinstance(scorer, Stage1Scorer)
    info = json.loads(next(out.glob("step-*/stage1.json")).read_text())
    lineage = info["lineage"]
    assert lineage["kind"] == "finetune-filter"
    assert lineage["parent"]["checkpoint"] == str((Path(parents["stage1"]) / "step-00000000").resolve())
    assert lineage["annotated"]["sha256"] == read_annotated(annotated["path"]).fingerprint()
    assert lineage["split"]["calibration_images"] == 10 and lineage["split"]["finetune_images"] == 30
    assert info["config"]["init_from"] and info["config"]["itg_weight"] == 0.0

    # Both scorers measured on the same held-out pairs; the filter thresholds the one with more recall.
    each = {score: load_calibration(out / f"calibration-{score}.json") for score in ("itm", "clip")}
    assert {c.score for c in each.values()} == {"itm", "clip"}
    assert each["itm"].positives == each["clip"].positives and each["itm"].negatives == each["clip"].negatives
    cal = load_calibration(out)
    best = max(each.values(), key=lambda c: (c.predicted_recall or -1, c.score == "itm"))
    assert cal.score == best.score and cal.threshold == best.threshold and cal.extra["chosen_by"] == "best"
    assert set(cal.extra["alternatives"]) == {"itm", "clip"}
    assert f"calibrated: keep {cal.score.upper()} >=" in printed
    cal = each["itm"]
    assert cal.target_precision == 0.5 and cal.predicted_precision >= 0.5 and 0 < cal.threshold < 1
    assert cal.positives == lineage["split"]["calibration_pairs"]
    assert cal.negatives["random"] > 0 and cal.negatives["hard"] > 0
    # hard negatives searched among every annotated caption, the finetuning part's too
    split = lineage["split"]
    assert cal.extra["hard_negative_texts"] == split["calibration_pairs"] + split["finetune_pairs"]
    assert cal.split == lineage["split"] and cal.annotated["sha256"] == lineage["annotated"]["sha256"]


def test_a_fold_trains_on_every_image_but_its_own_and_the_folds_split_the_run(parents):
    from model.data import fold_of, load_curated_images, training_images
    from model.train_stage1 import Stage1Config

    every = {im.sample_id for im in load_curated_images(parents["data"], "r1")}
    kept = []
    for fold in range(3):
        config = Stage1Config(root=parents["data"], run="r1", vision=parents["vision"], out="o", folds=3, fold=fold)
        images, _ = training_images(config, None, None)
        kept.append({im.sample_id for im in images})
        assert kept[-1] == {s for s in every if fold_of(s, 3) != fold}
    assert set.union(*({s for s in every if s not in k} for k in kept)) == every  # each image left out once
    # sha1 of the sample id, not Python's salted hash(): every process and run agrees
    assert all(every - k for k in kept) and (fold_of("part-00000/7", 3), fold_of("part-00000/7", 2)) == (2, 0)
    for bad in ({"folds": 2}, {"folds": 2, "fold": 2}, {"fold": 0}, {"folds": 0}):
        with pytest.raises(ConfigError, match="--fold"):
            Stage1Config(root="r", run="x", vision="v", out="o", **bad)


def test_an_out_of_fold_filter_scores_each_image_with_the_model_that_never_trained_on_it(annotated, parents, tmp_path,
                                                                                       capsys):
    from model.data import fold_of, load_curated_images
    from model.folds import FoldedItm
    from model.scorers import load_clip, load_itm, save_random_clip
    from model.train_stage1 import Stage1Config, train
    from pipeline.caption import decode_image
    from pipeline.calibrate import load_calibration
    from pipeline.score import score_pairs

    parent = Stage1Config(root=parents["data"], run="r1", vision=parents["vision"], out=str(tmp_path / "stage1"),
                          tokenizer=parents["tokenizer"], bert=None, model=TINY_QFORMER, steps=4, batch_size=4,
                          warmup_steps=1, lr=1e-3, augment=False, checkpoint_every=4, progress=False, device="cpu")
    train(parent)
    out = tmp_path / "filter"
    cli_main(["finetune", "filter", "--annotated", annotated["path"], "--stage1", parent.out, "--out", str(out),
              "--folds", "2", "--steps", "2", "--batch-size", "8", "--holdout-fraction", "0.25",
              "--target-precision", "0.5", "--device", "cpu"])
    assert "calibrated: keep ITM >=" in capsys.readouterr().out

    # each fold's Stage 1: the parent's recipe on the run less that fold, half the steps
    for fold in (0, 1):
        info = json.loads(next((out / f"fold-{fold}" / "stage1").glob("step-*/stage1.json")).read_text())
        assert (info["config"]["fold"], info["config"]["folds"], info["config"]["steps"]) == (fold, 2, 2)
        assert info["config"]["run"] == "r1" and info["config"]["lr"] == parent.lr
        finetuned = json.loads((out / f"fold-{fold}" / "filter" / "finetune.json").read_text())
        assert finetuned["kind"] == "finetune-filter"
        # finetuned on every finetuning image: the fold is the parent's, not the annotated set's
        assert (finetuned["config"]["folds"], finetuned["config"]["fold"]) == (1, None)
    assert json.loads((out / "finetune.json").read_text())["folds"] == 2

    folded = load_itm(str(out), device="cpu")  # what `capfilt filter --itm DIR` does
    assert isinstance(folded, FoldedItm) and folded.keyed
    each = [load_itm(str(out / f"fold-{fold}" / "filter"), device="cpu") for fold in (0, 1)]
    images = load_curated_images(parents["data"], "r1")
    pictures = [decode_image(im.image) for im in images]
    keys = [im.sample_id for im in images]
    texts = [im.captions[0] for im in images]
    assert {fold_of(k, 2) for k in keys} == {0, 1}
    scores = [model.match_probability(pictures, texts) for model in each]
    assert not np.allclose(scores[0], scores[1], atol=1e-4)  # two models: the routing below is tested
    expected = np.array([scores[fold_of(k, 2)][i] for i, k in enumerate(keys)])
    np.testing.assert_allclose(folded.match_probability(pictures, texts, keys=keys), expected, rtol=1e-4, atol=1e-6)

    # the score stage names each image by its sample id
    clip_config, clip_name, clip_checkpoint = save_random_clip(str(tmp_path / "clip"))
    pairs = pa.table({"sample_id": keys, "caption_id": list(range(len(keys))), "caption_source": ["web"] * len(keys),
                      "caption": texts, "degenerate": [False] * len(keys), "image": [im.image for im in images]})
    scored = score_pairs(pairs, load_clip(clip_name, clip_checkpoint, "cpu", clip_config), folded)
    np.testing.assert_allclose(scored.column("itm_score").to_numpy(), expected, rtol=1e-4, atol=1e-6)

    cal = load_calibration(out)  # calibrated as one scorer, on images no fold model trained on
    assert cal.score == "itm" and cal.scorer == str(out.resolve()) and cal.positives > 0 and 0 < cal.threshold < 1

    (out / "config.json").write_text(json.dumps({"model_type": "capfilt-folds", "folds": 2, "models": ["fold-0/filter"]}))
    with pytest.raises(ConfigError, match=r"--itm .*config\.json names 1 models for 2 folds"):
        load_itm(str(out), device="cpu")


def test_finetuned_captioner_starts_from_its_parent_and_loads_as_a_captioner(annotated, parents, tmp_path, capsys):
    from safetensors.torch import load_file

    from model.captioners import load_captioner
    from model.stage2 import resolve_checkpoint

    out = tmp_path / "captioner"
    # A vanishing learning rate: the result must be the parent itself, which proves where it started.
    cli_main(["finetune", "captioner", "--annotated", annotated["path"], "--stage2", parents["stage2"], "--out", str(out),
              "--steps", "2", "--lr", "1e-12", "--batch-size", "8", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "finetuned captioner: 2 steps" in printed
    # both captioned the 8 held-out images (references: their human captions); the same weights
    # write the same captions, so the before/after scores agree exactly
    heldout = json.loads((out / "heldout.json").read_text())
    assert heldout["images"] == 8 and heldout["parent"]["images"] == heldout["finetuned"]["images"] == 8
    assert heldout["parent"]["samples"] == heldout["finetuned"]["samples"]
    assert heldout["parent"]["cider"] == heldout["finetuned"]["cider"] and heldout["parent"]["cider"] is not None
    assert f"held-out annotated images (8): CIDEr {heldout['parent']['cider']:.3f} (parent)" in printed
    parent = load_file(str(resolve_checkpoint(parents["stage2"])[1] / "model.safetensors"))
    child = load_file(str(resolve_checkpoint(out)[1] / "model.safetensors"))
    assert parent.keys() == child.keys()
    assert all(torch.allclose(parent[k], child[k], atol=1e-6) for k in parent)

    info = json.loads(next(out.glob("step-*/stage2.json")).read_text())
    assert info["lineage"]["kind"] == "finetune-captioner" and info["lineage"]["recipe"]["losses"] == "lm"
    assert info["lineage"]["parent"]["checkpoint"] == str(resolve_checkpoint(parents["stage2"])[0].resolve())
    assert info["lineage"]["split"]["calibration_images"] == 8  # the default 20% held out, never trained on

    captioner = load_captioner(str(out), device="cpu")  # what `capfilt caption --captioner DIR` does
    from model.captioners import Decoding

    inputs = captioner.prepare([annotated["images"][0].image], "")
    texts = captioner.generate(inputs, Decoding(num_captions=1, num_beams=1, max_length=5, min_length=1), [[0]])
    assert len(texts) == 1 and len(texts[0]) == 1
    assert heldout["selected"] == "finetuned" and not (out / "selected").exists()  # a tie keeps the finetuned


def test_a_finetuned_captioner_that_loses_on_the_held_out_part_loads_as_its_parent(annotated, parents, tmp_path,
                                                                                   monkeypatch):
    """Model selection as LAVIS keeps its best validation checkpoint; the measurement is faked here
    (the tiny models' CIDEr is 0 either way), the selection and loading are real."""
    import pipeline.finetune as finetune
    from model.finetune import FinetuneSettings
    from model.stage2 import resolve_checkpoint

    real = finetune.heldout_captioning
    monkeypatch.setattr(finetune, "heldout_captioning", lambda captioners, *a, **k: {
        name: {"cider": {"parent": 1.0, "finetuned": 0.5}[name], "bleu4": 0.0} for name in captioners})
    out = tmp_path / "captioner"
    settings = FinetuneSettings(out=str(out), steps=2, lr=1e-3, batch_size=8, device="cpu", progress=False)
    result = finetune.run_finetune_captioner(annotated["path"], parents["stage2"], settings)
    assert result["heldout"]["selected"] == "parent"
    assert resolve_checkpoint(out)[0] == resolve_checkpoint(parents["stage2"])[0].resolve()  # loads as the parent
    assert json.loads((out / "heldout.json").read_text())["selected"] == "parent"
    assert (out / "step-00000002").is_dir()  # the finetuned steps stay
    monkeypatch.setattr(finetune, "heldout_captioning", real)
    result = finetune.run_finetune_captioner(annotated["path"], parents["stage2"], settings)  # resumes, measures again
    assert result["heldout"]["selected"] == "finetuned" and resolve_checkpoint(out)[0] == out / "step-00000002"


def test_finetuning_refuses_a_finetuning_part_smaller_than_a_batch(annotated, parents, tmp_path):
    from model.finetune import FinetuneSettings
    from pipeline.finetune import run_finetune_filter

    with pytest.raises(ConfigError, match="fewer than --batch-size 64"):
        run_finetune_filter(annotated["path"], parents["stage1"], FinetuneSettings(out=str(tmp_path / "o"), batch_size=64))


def test_curate_annotated_calibrates_an_itm_model_as_it_is_on_the_whole_set(tmp_path, annotated):
    """`capfilt curate --annotated`: no finetuning, the given ITM model's threshold is calibrated on
    every annotated image (matched vs random and hard negatives) and the curve written."""
    from model.scorers import save_random_itm
    from pipeline.calibrate import calibrate_on_annotated, load_calibration

    # An ITM head of zeros scores every pair alike (precision = the 0.5 prior at any threshold), so the
    # unreachable target below does not hang on a random draw (a draw whose top-scored pair is a match
    # reaches any precision at one pair, and draws differ across CPUs).
    from transformers import BlipForImageTextRetrieval

    itm = save_random_itm(str(tmp_path / "itm"))
    model = BlipForImageTextRetrieval.from_pretrained(itm)
    torch.nn.init.zeros_(model.itm_head.weight), torch.nn.init.zeros_(model.itm_head.bias)
    model.save_pretrained(itm)
    cal = calibrate_on_annotated(itm, annotated["path"], tmp_path / "run" / "calibration.json", target_precision=0.4)
    assert cal.positives == sum(len(im.captions) for im in annotated["images"])  # the whole set: nothing held out
    assert cal.negatives["random"] > 0 and cal.negatives["hard"] > 0 and cal.scorer == itm
    assert load_calibration(tmp_path / "run" / "calibration.json").threshold == cal.threshold
    with pytest.raises(ConfigError, match="precision"):  # an uninformed ITM cannot reach 0.999: said, the curve kept
        calibrate_on_annotated(itm, annotated["path"], tmp_path / "hard.json", target_precision=0.999)
    assert (tmp_path / "hard.json").exists()


def test_the_itm_warning_is_for_a_stage1_that_trained_on_a_run_not_one_pretrained_elsewhere(annotated, parents, tmp_path,
                                                                                           caplog):
    """A filter that thresholds its ITM warns where its Stage 1 trained on a run (a round judges the pairs it
    learnt), not where that Stage 1 was pretrained on pairs of no run (the toy preset's, a public checkpoint)."""
    from model.data import load_curated_images
    from model.train_stage1 import Stage1Config, train

    common = dict(vision=parents["vision"], tokenizer=parents["tokenizer"], bert=None, model=TINY_QFORMER, steps=2,
                  batch_size=4, warmup_steps=1, lr=1e-3, augment=False, checkpoint_every=2, progress=False, device="cpu")
    on_run = Stage1Config(root=parents["data"], run="r1", out=str(tmp_path / "on-run"), **common)
    train(on_run)
    elsewhere = Stage1Config(root=str(tmp_path), run="", out=str(tmp_path / "elsewhere"), **common)
    train(elsewhere, images=load_curated_images(parents["data"], "r1"), lineage={"pairs": 16})
    for parent, warned in ((on_run.out, True), (elsewhere.out, False)):
        caplog.clear()
        cli_main(["finetune", "filter", "--annotated", annotated["path"], "--stage1", parent,
                  "--out", str(tmp_path / f"filter-{warned}"), "--steps", "2", "--batch-size", "8",
                  "--holdout-fraction", "0.25", "--target-precision", "0.5", "--device", "cpu"])
        assert json.loads((tmp_path / f"filter-{warned}" / "calibration.json").read_text())["score"] == "itm"
        assert ("remembers the pairs" in caplog.text) is warned, caplog.text
