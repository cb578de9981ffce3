"""The Stage 1 trainer on a curated synthetic run: exact resume, frozen encoder, data transforms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.qformer import QFormer, load_tokenizer
from model.train_stage1 import (
    Stage1Batches,
    Stage1Config,
    Stage1Objective,
    build_model,
    load_curated_images,
    lr_factor,
    param_groups,
    random_resized_crop,
    swap_left_right,
    train,
)
from model.vision import load_vision_encoder
from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  num_query_tokens=8, embed_dim=32, max_position_embeddings=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage1")
    make_curated_run(base / "data", "r1", images=24, seed=0)
    return {
        "root": str(base / "data"),
        "tokenizer": str(make_tokenizer(base / "tok")),
        "vision": make_clip_vision(base / "clip"),
    }


def config(world, out, **overrides) -> Stage1Config:
    settings = dict(root=world["root"], run="r1", vision=world["vision"], out=str(out), tokenizer=world["tokenizer"],
                    bert=None, model=TINY_MODEL, steps=6, batch_size=8, warmup_steps=2, lr=1e-3,
                    log_every=1, checkpoint_every=3, progress=False)
    settings.update(overrides)
    return Stage1Config(**settings)


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_reproduces_the_uninterrupted_run(world, tmp_path):
    straight = train(config(world, tmp_path / "straight"))
    interrupted = train(config(world, tmp_path / "resumed", stop_at=3))
    assert interrupted["step"] == 3
    resumed = train(config(world, tmp_path / "resumed"))
    assert straight["step"] == resumed["step"] == 6
    keys = ("step", "loss", "itc", "itm", "itg", "lr", "epoch", "batch_in_epoch")
    a = [{k: r[k] for k in keys} for r in losses(tmp_path / "straight")]
    b = [{k: r[k] for k in keys} for r in losses(tmp_path / "resumed")]
    assert a == b and len(a) == 6
    m1 = QFormer.from_pretrained(Path(straight["checkpoint"]) / "model").state_dict()
    m2 = QFormer.from_pretrained(Path(resumed["checkpoint"]) / "model").state_dict()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    saved = json.loads((Path(resumed["checkpoint"]) / "stage1.json").read_text())
    assert saved["curated_run"]["run"] == "r1" and saved["data_position"]["epoch"] == 6 // 3  # 3 batches/epoch
    lineage = saved["lineage"]  # what data made this model
    assert lineage["run"] == "r1" and lineage["curated_pairs"] == lineage["curated_images"] * 2
    assert lineage["caption_sources"] == {"synthetic": lineage["curated_pairs"]}


def test_training_never_changes_the_frozen_encoder(world):
    cfg = config(world, "unused", model={**TINY_MODEL, "hidden_dropout_prob": 0.0})
    encoder = load_vision_encoder(cfg.vision)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, tokenizer, encoder.width)
    objective = Stage1Objective(model, cfg).train()
    optimizer = torch.optim.AdamW(list(objective.parameters()) + list(encoder.parameters()), lr=1e-2)
    data = Stage1Batches(load_curated_images(cfg.root, cfg.run), tokenizer, encoder.preprocess, cfg)
    for micro in range(3):
        batch = data[micro]
        out = objective(encoder(batch["pixels"]), batch["input_ids"], batch["attention_mask"], batch["image_ids"])
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_one_kept_caption_per_image_and_flips_swap_left_and_right(world):
    cfg = config(world, "unused", augment=True)
    tokenizer = load_tokenizer(cfg.tokenizer)
    encoder = load_vision_encoder(cfg.vision)
    images = load_curated_images(cfg.root, cfg.run)
    assert len(images) == 24 and all(len(im.captions) == 2 for im in images)
    data = Stage1Batches(images, tokenizer, encoder.preprocess, cfg)
    pixels, caption = data.example(0, 5)
    again_pixels, again_caption = data.example(0, 5)
    assert torch.equal(pixels, again_pixels) and caption == again_caption  # a function of (seed, epoch, image)
    kept = set(images[5].captions) | {swap_left_right(c) for c in images[5].captions}
    assert caption in kept
    assert swap_left_right("a red circle on the left, right?") == "a red circle on the right, left?"
    assert swap_left_right("bright lefty") == "bright lefty"


def test_cached_features_batches_carry_no_pixels_and_crops_follow_torchvision(world):
    from torchvision.transforms import RandomResizedCrop

    cfg = config(world, "unused", cache_features=True, augment=False)
    tokenizer = load_tokenizer(cfg.tokenizer)
    encoder = load_vision_encoder(cfg.vision)
    data = Stage1Batches(load_curated_images(cfg.root, cfg.run), tokenizer, encoder.preprocess, cfg)
    batch = data[4]
    assert "pixels" not in batch and batch["input_ids"].shape[0] == cfg.batch_size  # nothing decoded
    # texts padded to the batch's longest, not to max_text_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(dim=1).max()) < cfg.max_text_length
    assert data.plain_pixels([0, 1]).shape == (2, 3, encoder.preprocess.image_size, encoder.preprocess.image_size)
    # The explicit generator draws what torchvision draws from a globally seeded one.
    for seed, size in ((0, (32, 32)), (1, (64, 20)), (2, (20, 64))):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(torch.zeros(3, size[1], size[0]), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        assert random_resized_crop(size, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == tuple(expected)


def test_recipe_defaults_follow_the_paper(world):
    cfg = Stage1Config(root="r", run="x", vision="v", out="o")
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.betas, cfg.grad_clip) == (1e-4, 2000, 0.05, (0.9, 0.98), 1.0)
    assert lr_factor(0, cfg) == pytest.approx(1 / 2000) and lr_factor(1999, cfg) == pytest.approx(1.0)
    assert lr_factor(cfg.steps, cfg) == pytest.approx(cfg.min_lr / cfg.lr)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    decay, no_decay = param_groups(model, 0.05)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_bad_configs_say_what_to_fix(world, tmp_path):
    from capfilt.errors import ConfigError

    with pytest.raises(ConfigError, match="--no-augment"):
        config(world, tmp_path, cache_features=True, augment=True)
    with pytest.raises(ConfigError, match="no curated rows"):
        train(config(world, tmp_path, run="empty"))
    # a run whose filter ran and kept nothing is told so (not to run the filter)
    from pipeline.run_store import RunStore, ShardCounts

    store = RunStore(config(world, tmp_path).root, "kept-nothing")
    store.start_shard("select", "part-0", "h")
    store.commit_shard("select", "part-0", "h", {}, ShardCounts(rows_in=7, kept=0, rejected=7))
    with pytest.raises(ConfigError, match=r"its filter kept none of its 7 captions.*filter\.html"):
        train(config(world, tmp_path, run="kept-nothing"))


def test_a_run_smaller_than_one_batch_trains_on_batches_of_all_it_has_and_says_so(caplog):
    """A strict filter or an ablation arm may keep fewer images than a batch: it still trains."""
    from capfilt.errors import ConfigError
    from model.train_stage1 import Stage1Batches, Stage1Config

    config = Stage1Config(root="r", run="x", vision="v", out="o", batch_size=32)
    data = Stage1Batches(list(range(5)), None, None, config)
    assert data.batch_size == 5 and sorted(data.indices(0)[1]) == [0, 1, 2, 3, 4]
    assert "5 training images fill no batch of 32" in caplog.text
    assert Stage1Batches(list(range(40)), None, None, config).batch_size == 32
    with pytest.raises(ConfigError, match="batch of 2"):
        Stage1Batches([0], None, None, config)
