"""A Stage 1 checkpoint is an ITM scorer for the Filter stage: `--itm <trainer --out folder>`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capfilt.errors import ConfigError
from model.qformer import CONFIG_NAME, MODEL_TYPE, QFormerConfig
from model.scorers import ItmScorer, itm_model_type, load_itm
from model.train_stage1 import Stage1Config, train
from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  num_query_tokens=8, embed_dim=32, max_position_embeddings=64)


@pytest.fixture(scope="module")
def stage1_out(tmp_path_factory):
    """A real (two-step) `train` output folder: latest -> step-00000002/{model/, trainer.pt, stage1.json}.

    The image encoder is a transformers folder so a Ray actor loads it as it is; an open_clip
    spec naming a config registered only in the test process would not resolve there.
    """
    base = tmp_path_factory.mktemp("stage1itm")
    make_curated_run(base / "data", "r1", images=8, seed=0)
    config = Stage1Config(root=str(base / "data"), run="r1", vision=make_clip_vision(base / "clip"), out=str(base / "out"),
                          tokenizer=str(make_tokenizer(base / "tok")), bert=None, model=TINY_MODEL, steps=2, batch_size=4,
                          warmup_steps=1, log_every=1, checkpoint_every=2, progress=False)
    train(config)
    return base / "out"


def scenes(n=5):
    from caption_helpers import image_rows

    rows = image_rows("s", n)
    return [r["image"] for r in rows], [r["caption"] for r in rows]


def test_every_stage1_folder_form_loads_as_an_itm_scorer(stage1_out):
    from model.stage1_inference import Stage1Scorer

    step = stage1_out / (stage1_out / "latest").read_text().strip()
    assert json.loads((step / "model" / CONFIG_NAME).read_text())["model_type"] == MODEL_TYPE == "capfilt-qformer"
    data, texts = scenes()
    pil = [Image.open(io.BytesIO(d)) for d in data]
    texts[1] = texts[0]  # a caption of another image
    results = []
    for folder in (stage1_out, step, step / "model"):
        assert itm_model_type(str(folder)) == "capfilt-qformer"
        scorer = load_itm(str(folder), device="cpu")
        assert isinstance(scorer, ItmScorer) and isinstance(scorer, Stage1Scorer)
        probs = scorer.match_probability(pil, texts)
        assert probs.shape == (5,) and probs.dtype == np.float32 and ((probs >= 0) & (probs <= 1)).all()
        results.append(probs)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    # PIL images (the Filter stage) and encoded bytes (training, retrieval) are scored alike.
    np.testing.assert_allclose(results[0], scorer.itm_scores(data, texts).numpy(), atol=1e-6)


def test_old_qformer_configs_without_model_type_still_load(stage1_out, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(stage1_out, old)
    step = old / (old / "latest").read_text().strip()
    config_path = step / "model" / CONFIG_NAME
    data = json.loads(config_path.read_text())
    del data["model_type"]
    config_path.write_text(json.dumps(data))
    assert itm_model_type(str(old)) == "capfilt-qformer"
    assert load_itm(str(old), device="cpu").match_probability([Image.new("RGB", (32, 32))], ["a red circle"]).shape == (1,)
    assert QFormerConfig.from_json(json.dumps({**data, "model_type": MODEL_TYPE})) == QFormerConfig.from_json(json.dumps(data))
    with pytest.raises(ConfigError, match="model_type 'bert' is not a capfilt Q-Former"):
        QFormerConfig.from_json(json.dumps({**data, "model_type": "bert"}), where=str(config_path))


def test_a_model_folder_alone_loads_with_the_encoder_it_names(stage1_out, tmp_path):
    step = stage1_out / (stage1_out / "latest").read_text().strip()
    lone = tmp_path / "lone"
    shutil.copytree(step / "model", lone / "model")  # no stage1.json beside it
    config_path = lone / "model" / CONFIG_NAME
    data = json.loads(config_path.read_text())
    assert data["vision"] == json.loads((step / "stage1.json").read_text())["vision"]
    scorer = load_itm(str(lone / "model"), device="cpu")
    assert scorer.match_probability([Image.new("RGB", (32, 32))], ["a red circle"]).shape == (1,)
    assert QFormerConfig.from_json(config_path.read_text()) == QFormerConfig.from_json(
        json.dumps({k: v for k, v in data.items() if k != "vision"}))  # the encoder is not the architecture

    del data["vision"]  # a folder saved before models named their encoder
    config_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no stage1.json"):
        load_itm(str(lone / "model"), device="cpu")


@pytest.mark.slow
def test_capfilt_filter_scores_every_pair_with_a_stage1_checkpoint(stage1_out, ray_local, tmp_path):
    import pyarrow.compute as pc

    from capfilt.cli import cli
    from caption_helpers import commit_image_shards
    from model.scorers import save_random_clip
    from model.stage1_inference import Stage1Scorer
    from pipeline.run_store import RunStore
    from schemas import CAPTIONS, SCORES
    from test_filter import commit_caption_shards

    root = str(tmp_path / "root")
    store = RunStore(root, "f")
    commit_image_shards(store, {"s0": 4, "s1": 3})
    commit_caption_shards(store, ["s0", "s1"])
    clip_config, clip_name, clip_checkpoint = save_random_clip(str(tmp_path / "clip"))
    argv = ["filter", "--root", root, "--run", "f", "--clip", clip_name, "--clip-config", clip_config,
            "--clip-pretrained", clip_checkpoint, "--itm", str(stage1_out), "--policy", "blip2", "--top-k", "2",
            "--dedup-eps", "0.0"]
    cli.main(args=argv, prog_name="capfilt", standalone_mode=False)
    scores = store.read("scores", SCORES)
    assert scores.num_rows == store.read("captions", CAPTIONS).num_rows == 7 * 4
    itm = scores.column("itm_score")
    assert itm.null_count == 0 and pc.min(itm).as_py() >= 0.0 and pc.max(itm).as_py() <= 1.0
    # The actor's scores are the checkpoint's ITM head on those pairs.
    images = {r["sample_id"]: r["image"] for r in store.read("images").select(["sample_id", "image"]).to_pylist()}
    expected = Stage1Scorer.from_checkpoint(stage1_out, device="cpu").itm_scores(
        [images[s] for s in scores.column("sample_id").to_pylist()], [t or "" for t in scores.column("caption").to_pylist()])
    np.testing.assert_allclose(itm.to_numpy(), expected.numpy(), atol=1e-5)
    provenance = json.loads(store.read("curated").column("provenance")[0].as_py())
    assert provenance["itm"] == str(stage1_out)
