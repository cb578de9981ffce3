"""Evaluation metrics on crafted inputs with known answers, and `capfilt eval` on small runs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from capfilt.errors import ConfigError
from model.toy.scenes import render, true_caption
from pipeline.evaluate import EvalConfig, run_eval
from pipeline.metrics import (
    attribute_accuracy,
    caption_correct,
    caption_scores,
    normalize_caption,
    parse_attributes,
    precision_recall,
    recall_at_k,
    relevance,
    rerank,
    score_auc,
)
from pipeline.run_store import RunStore, ShardCounts
from schemas import IMAGES, SCORES, curated_outputs
from stage1_world import jpeg

SCENE = {"shape": "circle", "color": "red", "size": "small", "position": "left", "background": "black"}


# -- retrieval ----------------------------------------------------------------------------------

def test_recall_at_k_counts_a_relevant_item_within_the_first_k():
    ranked = [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    assert recall_at_k(ranked, [{0}, {0}, {0}], ks=(1, 2, 3)) == {"r1": 1 / 3, "r2": 2 / 3, "r3": 1.0}
    # any of several relevant items counts
    assert recall_at_k(ranked, [{0, 9}, {0, 2}, {0}], ks=(1,)) == {"r1": 2 / 3}
    with pytest.raises(ValueError):
        recall_at_k(ranked, [{0}])


def test_equal_captions_are_relevant_to_every_image_they_describe():
    i2t, t2i = relevance(["a red circle", "a blue square", "a red circle"], [0, 1, 2], 3)
    assert t2i == [{0, 2}, {1}, {0, 2}]
    assert i2t == [{0, 2}, {1}, {0, 2}]


def test_rerank_reorders_only_the_itc_top_k_by_itm_plus_itc():
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    # ITM strongly prefers candidate 2, then 1: only the top 3 by ITC are re-ranked
    itm = torch.tensor([0.0, 1.0, 5.0, 100.0])
    assert rerank(sims, 3, lambda q, cand: itm[cand]) == [[2, 1, 0, 3]]
    assert rerank(sims, 0, lambda q, cand: itm[cand]) == [[0, 1, 2, 3]]
    # candidate 3 wins once it is inside the top k
    assert rerank(sims, 4, lambda q, cand: itm[cand])[0][0] == 3


def test_itm_reranking_in_passes_of_many_pairs_scores_as_one_pair_at_a_time(tmp_path):
    from model.stage1_inference import Stage1Scorer
    from pipeline.evaluate import stage1_retrieval
    from stage1_world import make_clip_vision
    from stage2_world import make_stage1_checkpoint

    scorer = Stage1Scorer.from_checkpoint(make_stage1_checkpoint(tmp_path / "s1", make_clip_vision(tmp_path / "clip")),
                                          device="cpu")
    with torch.no_grad():  # an untrained head's logits differ by ~1e-4 between pairs: spread them out
        scorer.model.itm_head.weight.mul_(1000)
    rng = np.random.default_rng(0)
    scenes = [dict(SCENE, color=c, shape=s) for c in ("red", "blue", "green") for s in ("circle", "square")]
    images = [jpeg(render(attrs, 32, rng)) for attrs in scenes]
    texts = [true_caption(attrs) for attrs in scenes] + ["a red circle", "thumbnail"]
    text_image = list(range(len(scenes))) + [0, 5]
    with torch.no_grad():
        tokens, (ids, mask) = scorer._tokens(images), scorer._text(texts)
        # every pair alone: its own image copy, its text padded to max_length
        alone = torch.tensor([[float(scorer.model.itm_logits(tokens[i:i + 1], ids[t:t + 1], mask[t:t + 1])[0, 1])
                               for t in range(len(texts))] for i in range(len(images))])
        image_rows, text_rows = torch.arange(len(images)).repeat_interleave(len(texts)), torch.arange(len(texts)).repeat(len(images))
        # passes of 5 pairs: several images and texts per pass, an image's pairs split across passes
        batched = scorer.pair_logits(tokens, ids, mask, image_rows, text_rows, pairs_per_forward=5)
    assert alone.std() > 0.05
    assert batched.view(len(images), len(texts)) == pytest.approx(alone, abs=1e-4)

    result = stage1_retrieval(scorer, images, texts, text_image, k=4)
    with torch.no_grad():
        image_feats, text_feats = scorer.model.image_features(tokens), scorer.model.text_features(ids, mask)
        sims = torch.einsum("td,nqd->tnq", text_feats, image_feats).amax(dim=-1)
    i2t_rel, t2i_rel = relevance(texts, text_image, len(images))
    assert result["itm"]["image_to_text"] == recall_at_k(rerank(sims.T, 4, lambda q, c: alone[q[:, None], c]), i2t_rel)
    assert result["itm"]["text_to_image"] == recall_at_k(rerank(sims, 4, lambda q, c: alone.T[q[:, None], c]), t2i_rel)


# -- captions and attributes --------------------------------------------------------------------

def test_caption_scores_are_perfect_for_the_reference_and_lower_for_wrong_captions():
    refs = [[true_caption(SCENE)], ["a large blue square at the top of a white background"],
            ["a small green cross in the middle of a gray background"]]
    perfect = caption_scores([r[0].upper() + "." for r in refs], refs)  # case and punctuation do not count
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["images"] == 3
    wrong = caption_scores(["a large blue square at the top of a white background"] * 3, refs)
    assert wrong["bleu4"] < perfect["bleu4"] and wrong["cider"] < perfect["cider"]
    junk = caption_scores(["click here", "thumbnail", ""], refs)
    assert junk["bleu4"] < 1e-3 and junk["cider"] == pytest.approx(0.0, abs=1e-6)
    assert normalize_caption("A  Red-Circle, on the LEFT!") == "a red circle on the left"


def test_attributes_are_parsed_from_every_phrasing_of_the_world():
    assert parse_attributes("photo of a small red circle in the middle on a black background") == dict(SCENE, position="center")
    assert parse_attributes("small red circle in the upper part, black background")["position"] == "top"
    # two values of one attribute: neither counts
    assert parse_attributes("a small red blue circle on the left")["color"] is None
    assert parse_attributes("IMG_0042.jpg") == {a: None for a in SCENE}
    assert caption_correct(true_caption(SCENE), SCENE)
    assert not caption_correct("a small red circle on the left", SCENE)  # no background named


def test_attribute_accuracy_is_the_fraction_of_attributes_right():
    captions = [true_caption(SCENE), "a large red circle on the left of a white background", "thumbnail"]
    result = attribute_accuracy(captions, [SCENE] * 3)
    assert result["attribute_accuracy"] == pytest.approx((5 + 3 + 0) / 15)
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["per_attribute"]["color"] == pytest.approx(2 / 3)
    assert result["per_attribute"]["size"] == pytest.approx(1 / 3)


# -- filter quality -----------------------------------------------------------------------------

def test_precision_and_recall_of_kept_pairs():
    kept = [True, True, True, False, False]
    correct = [True, True, False, True, False]
    result = precision_recall(kept, correct)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == pytest.approx(2 / 3)
    assert precision_recall([False, False], [True, False])["precision"] is None


def test_roc_auc_of_a_score_for_clean_over_corrupted():
    clean = [True, True, False, False]
    assert score_auc([0.9, 0.8, 0.2, 0.1], clean)["auc"] == 1.0
    assert score_auc([0.1, 0.2, 0.8, 0.9], clean)["auc"] == 0.0
    assert score_auc([0.9, 0.2, 0.8, 0.1], clean)["auc"] == 0.75
    missing = score_auc([0.9, None, 0.2, float("nan")], clean)
    assert missing["auc"] == 1.0 and missing["unscored"] == 2
    assert score_auc([0.9, 0.8], [True, True])["auc"] is None


def make_scored_run(root, run: str) -> str:
    """A run with images/, scores/ and curated/ of four scenes, and a ground-truth sidecar.

    Web captions: img0 clean (kept), img1 clean (dropped), img2 corrupted (kept), img3 corrupted
    (dropped). Synthetic: img0 right (kept), img1 wrong (kept). CLIP ranks every clean web
    caption above every corrupted one; ITM ranks them backwards.
    """
    rng = np.random.default_rng(0)
    scenes = [dict(SCENE), dict(SCENE, color="blue"), dict(SCENE, shape="square"), dict(SCENE, size="large")]
    truth, images, scores = [], [], []
    webs = [true_caption(scenes[0]), true_caption(scenes[1]), true_caption(scenes[3]), "click here"]
    for i, attrs in enumerate(scenes):
        url, sid = f"http://127.0.0.1:1/img/{i:06d}.jpg", f"src/{i}"
        truth.append({"url": url, "kind": "image", "image_index": i, "true_caption": true_caption(attrs),
                      "web_caption": webs[i], "corrupted": i >= 2, **attrs})
        images.append({"sample_id": sid, "url": url, "image": jpeg(render(attrs, 32, rng)), "sha256": f"h{i}"})
        scores.append({"sample_id": sid, "caption_id": f"{sid}#web", "caption_source": "web", "caption": webs[i],
                       "clip_score": [0.9, 0.8, 0.3, 0.2][i], "itm_score": [0.1, 0.2, 0.8, 0.9][i]})
    scores.append({"sample_id": "src/0", "caption_id": "src/0#syn0", "caption_source": "synthetic",
                   "caption": true_caption(scenes[0]), "clip_score": 0.7, "itm_score": 0.7})
    scores.append({"sample_id": "src/1", "caption_id": "src/1#syn0", "caption_source": "synthetic",
                   "caption": true_caption(scenes[2]), "clip_score": 0.6, "itm_score": 0.6})
    kept_ids = {"src/0#web", "src/2#web", "src/0#syn0", "src/1#syn0"}
    by_sid = {im["sample_id"]: im for im in images}
    curated = [{**{k: s[k] for k in ("sample_id", "caption_id", "caption", "caption_source", "clip_score", "itm_score")},
                "image": by_sid[s["sample_id"]]["image"], "url": by_sid[s["sample_id"]]["url"], "run_id": run}
               for s in scores if s["caption_id"] in kept_ids]
    store = RunStore(str(root), run)
    store.commit_shard("ingest", "00000", "h", outputs={"images": (IMAGES, pa.Table.from_pylist(images))},
                       counts=ShardCounts(rows_in=4, kept=4))
    store.commit_shard("score", "00000", "h", outputs={"scores": (SCORES, pa.Table.from_pylist(scores))},
                       counts=ShardCounts(rows_in=6, kept=6))
    store.commit_shard("select", "00000", "h", outputs=curated_outputs(curated),
                       counts=ShardCounts(rows_in=6, kept=4, rejected=2), rejected=None)
    sidecar = root / "ground_truth.parquet"
    pq.write_table(pa.Table.from_pylist(truth), sidecar)
    return str(sidecar)


def test_filter_quality_of_a_run_against_its_ground_truth(tmp_path):
    sidecar = make_scored_run(tmp_path, "f")
    result = run_eval(EvalConfig(root=str(tmp_path), run="f", truth=sidecar))
    quality = result["filter"]
    assert quality["pairs_with_truth"] == 6
    # kept: img0 web (right), img2 web (wrong), img0 syn (right), img1 syn (wrong)
    assert quality["all"]["precision"] == pytest.approx(2 / 4)
    # right pairs: img0 web, img1 web, img0 syn -> 2 of 3 kept
    assert quality["all"]["recall"] == pytest.approx(2 / 3)
    assert quality["web"]["precision"] == pytest.approx(1 / 2) and quality["synthetic"]["recall"] == 1.0
    auc = quality["auc_clean_vs_corrupted_web"]
    assert auc["clip_score"]["auc"] == 1.0 and auc["itm_score"]["auc"] == 0.0
    assert auc["clip_score"]["clean"] == 2 and auc["clip_score"]["corrupted"] == 2


def test_eval_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    from capfilt.cli import main

    sidecar = make_scored_run(tmp_path, "f")
    out = tmp_path / "metrics"
    main(["eval", "--root", str(tmp_path), "--run", "f", "--truth", sidecar, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "precision 0.500" in printed and "ROC-AUC clip_score" in printed
    assert json.loads((out / "eval.json").read_text())["filter"]["all"]["recall"] == pytest.approx(2 / 3)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--root", str(tmp_path), "--run", "f", "--truth", str(tmp_path / "nope.parquet"), "--out", str(out)])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_retrieval_and_captioning_on_the_stage1_holdout(tmp_path):
    from model.captioners import save_random_captioner
    from model.train_stage1 import Stage1Config, load_curated_images, split_holdout, train
    from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

    make_curated_run(tmp_path / "data", "r1", images=24, seed=0)
    tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                num_query_tokens=8, embed_dim=32, max_position_embeddings=64)
    config = Stage1Config(root=str(tmp_path / "data"), run="r1", vision=make_clip_vision(tmp_path / "clip"),
                          out=str(tmp_path / "s1"), tokenizer=str(make_tokenizer(tmp_path / "tok")), bert=None,
                          model=tiny, steps=2, batch_size=8, warmup_steps=1, holdout_images=6, progress=False)
    train(config)
    captioner = save_random_captioner(str(tmp_path / "cap"), family="blip")
    result = run_eval(EvalConfig(root=config.root, run="r1", stage1=config.out, captioner=captioner, rerank_k=4,
                                 num_beams=1, max_length=6, device="cpu"))

    _, held = split_holdout(load_curated_images(config.root, "r1"), 6, config.seed)
    assert result["eval_set"] == {"source": "stage1_holdout", "run": "r1", "in_sample": False, "images": 6,
                                  "references": "curated_captions", "without_references": 0}
    assert [s["sample_id"] for s in result["captioning"]["samples"]] == [im.sample_id for im in held][:5]
    retrieval = result["retrieval"]
    assert retrieval["images"] == 6 and retrieval["texts"] == 12  # two distinct captions per image
    # 6 images: every text finds its image within 10; R@k never falls as k grows
    for how in ("itc", "itm"):
        t2i = retrieval[how]["text_to_image"]
        assert t2i["r10"] == 1.0 and t2i["r1"] <= t2i["r5"] <= t2i["r10"]
    captioning = result["captioning"]
    assert 0.0 <= captioning["bleu4"] <= 1.0 and captioning["cider"] >= 0.0 and captioning["images"] == 6
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        EvalConfig(root="r", run="x")


def test_a_heldout_world_is_the_clean_evaluation_set(tmp_path):
    from model.toy.world import WorldConfig, make_world
    from pipeline.evaluate import evaluation_set, world_images

    make_world(tmp_path / "w", WorldConfig(images=6, seed=3, noise=0.0, bad_urls_per_kind=0, duplicates=0))
    images = world_images(str(tmp_path / "w"))
    assert len(images) == 6 and all(len(im.references) == 1 and im.truth["shape"] for im in images)
    assert images[0].references == [true_caption({a: images[0].truth[a] for a in SCENE})]
    chosen, info = evaluation_set(EvalConfig(root=str(tmp_path), run="x", stage1="s", heldout=str(tmp_path / "w"),
                                             max_images=4), None)
    assert len(chosen) == 4 and info["source"] == "heldout_world" and info["in_sample"] is False
    with pytest.raises(ConfigError, match="not a synthetic world folder"):
        world_images(str(tmp_path))
