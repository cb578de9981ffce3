"""Stage 2 (BLIP-2 generative): a Stage 1 Q-Former as the soft visual prompt of a frozen OPT or T5.

Everything is real and tiny: a Blip2VisionModel, a Stage 1 checkpoint folder, an OPT and a T5
pre-trained for a few steps on the synthetic world's captions, saved and loaded by folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from caption_helpers import commit_image_shards, image_rows
from stage1_world import make_clip_vision, make_curated_run
from stage2_world import make_blip2_vision, make_gpt2_without_pad, make_opt, make_stage1_checkpoint, make_t5

from capfilt.cli import main as cli_main
from capfilt.errors import ConfigError
from model.captioners import Decoding, load_captioner
from model.convert import export_blip2
from model.stage2 import (
    Blip2Stage2,
    Stage2Batches,
    Stage2Config,
    Stage2Generator,
    Stage2Objective,
    TextLayout,
    build_model,
    split_point,
    train,
)
from model.train_stage1 import load_curated_images, lr_factor, param_groups


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on 2 shared cores: a second torch thread makes each step ~50x slower under load.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage2")
    make_curated_run(base / "data", "r1", images=16, seed=0)
    vision = make_blip2_vision(base / "vision")
    return {"base": base, "root": str(base / "data"), "vision": vision,
            "stage1": str(make_stage1_checkpoint(base / "stage1", vision)),
            "opt": make_opt(base / "opt"), "t5": make_t5(base / "t5")}


def config(world, out, llm="opt", **overrides) -> Stage2Config:
    settings = dict(root=world["root"], run="r1", stage1=world["stage1"], llm=world[llm], out=str(out), steps=24,
                    batch_size=8, warmup_steps=2, lr=2e-3, min_lr=1e-4, augment=False, log_every=1,
                    checkpoint_every=6, progress=False, device="cpu")
    settings.update(overrides)
    return Stage2Config(**settings)


@pytest.fixture(scope="module")
def trained(world):
    """A Stage 2 OPT and T5 trained for 24 steps (shared by the generation and export tests)."""
    return {llm: train(config(world, world["base"] / f"out-{llm}", llm)) for llm in ("opt", "t5")}


def images(world, n=3) -> list[bytes]:
    return [im.image for im in load_curated_images(world["root"], "r1")[:n]]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -- text layout and labels ---------------------------------------------------------------------
def test_decoder_only_labels_cover_caption_and_eos_not_prompt_or_padding(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["opt"])
    layout = TextLayout(tok, "causal", max_text_length=32)
    a = layout.example("a photo of", "a red circle")
    b = layout.example("a photo of", "a small blue square on the left")
    prompt = tok("a photo of").input_ids
    assert prompt[0] == tok.bos_token_id  # OPT's tokenizer keeps its BOS, as Blip2Processor does
    assert a["input_ids"][: len(prompt)] == prompt and a["labels"][: len(prompt)] == [-100] * len(prompt)
    assert a["labels"][len(prompt):] == a["input_ids"][len(prompt):]
    assert a["input_ids"][-1] == tok.eos_token_id and tok.decode(a["labels"][len(prompt):-1]).strip() == "a red circle"
    batch = layout.collate([a, b])
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()
    assert (batch["labels"] != -100).sum() == len(a["labels"]) + len(b["labels"]) - 2 * len(prompt)


@pytest.mark.parametrize("llm,kind", [("opt", "causal"), ("t5", "seq2seq")])
def test_a_batch_laid_out_at_once_equals_the_collated_examples(world, llm, kind):
    from transformers import AutoTokenizer

    layout = TextLayout(AutoTokenizer.from_pretrained(world[llm]), kind, max_text_length=8)
    captions = ["a red circle", "", "a small blue square on the left of a big white background"]
    for prompt in ("a photo of", ""):
        splits = [1, 0, 4]
        expected = layout.collate([layout.example(prompt, c, s) for c, s in zip(captions, splits)])
        got = layout.batch(prompt, captions, splits)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_with_cached_features_an_images_captions_are_tokenized_the_first_time_it_is_drawn(world):
    """The layout's memo (on with cached features) learns every kept caption of a batch's images
    in one call, so later epochs drawing an image's other caption call no tokenizer; the batches
    are those laid out without a memo."""
    cfg = config(world, "unused", cache_features=True)
    model, encoder, _ = build_model(cfg, torch.device("cpu"))
    images = load_curated_images(cfg.root, cfg.run)
    assert min(len(im.captions) for im in images) == 2
    data = Stage2Batches(images, model.layout, encoder.preprocess, cfg)
    plain = TextLayout(model.tokenizer, "causal", cfg.max_text_length, model.config.caption_end)
    for micro in range(3 * data.per_epoch):
        indices, captions, _ = data.samples(micro)
        batch, expected = data[micro], plain.batch(cfg.prompt, captions)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
        assert {c for i in indices for c in images[i].captions} <= set(model.layout.memo)


def test_encoder_decoder_splits_the_caption_at_a_seeded_word_the_suffix_is_the_target(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["t5"])
    layout = TextLayout(tok, "seq2seq", max_text_length=32)
    caption = "a small red circle on the left"
    ex = layout.example("a photo of", caption, split=3)
    assert tok.decode(ex["input_ids"], skip_special_tokens=True) == "a photo of a small red"
    assert ex["input_ids"][-1] == tok.eos_token_id  # T5 appends </s> to the encoder text
    assert tok.decode(ex["labels"], skip_special_tokens=True) == "circle on the left" and ex["labels"][-1] == tok.eos_token_id
    splits = {split_point(0, epoch, 5, caption) for epoch in range(40)}
    assert split_point(0, 1, 5, caption) == split_point(0, 1, 5, caption)
    assert splits <= set(range(7)) and len(splits) > 3  # every word index may start the target, never past the end


@pytest.mark.parametrize("llm,prompt", [("opt", "a photo of"), ("gpt2", "")])
def test_loss_masks_queries_prompt_and_padding(world, tmp_path, llm, prompt):
    """The model's loss is the mean cross-entropy over caption tokens + eos only, with the
    gradients of that mean. Its LM head runs on the last query and the text only: GPT-2 with no
    prompt adds no BOS, so there the last query predicts the caption's first token."""
    llms = {**world, "gpt2": make_gpt2_without_pad(tmp_path / "gpt2")} if llm == "gpt2" else world
    cfg = config(llms, "unused", llm=llm, prompt=prompt)
    model, encoder, _ = build_model(cfg, torch.device("cpu"))
    model.eval()  # Q-Former dropout off: both computations see the same soft prompt
    data = Stage2Batches(load_curated_images(cfg.root, cfg.run), model.layout, encoder.preprocess, cfg)
    batch = data[0]
    feats = encoder(batch["pixels"])
    loss = model.loss(feats, batch["input_ids"], batch["attention_mask"], batch["labels"])
    prompt = model.soft_prompt(feats)
    embeds = torch.cat([prompt, model._embed(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long), batch["attention_mask"]], dim=1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits
    q = prompt.shape[1]
    predicted = logits[:, q - 1:-1]  # position t predicts token t + 1
    manual = torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), batch["labels"].reshape(-1),
                                               ignore_index=-100)
    assert model.keeps_logits and torch.allclose(loss, manual, atol=1e-6)
    assert (batch["labels"][:, 0] != -100).all() == (llm == "gpt2")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for got, expected in zip(torch.autograd.grad(loss, trainable), torch.autograd.grad(manual, trainable)):
        assert torch.allclose(got, expected, atol=1e-6)


# -- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_loss_falls(trained, llm):
    loss = [m["loss"] for m in trained[llm]["metrics"]]
    assert len(loss) == 24
    first, last = sum(loss[:6]) / 6, sum(loss[-6:]) / 6
    # a frozen LLM bounds how far 24 steps can go (~2.56 -> 2.25 for OPT, 1.93 -> 1.57 for T5);
    # without a learning soft prompt the loss stays flat
    assert last < 0.92 * first, (first, last)


def test_training_never_changes_the_llm_and_only_the_qformer_and_projection_learn(world):
    cfg = config(world, "unused")
    model, encoder, _ = build_model(cfg, torch.device("cpu"))
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    q_before = {k: v.clone() for k, v in model.qformer.state_dict().items()}
    objective = Stage2Objective(model).train()
    assert not model.language_model.training
    optimizer = torch.optim.AdamW(param_groups(objective, 0.05) + [{"params": list(model.language_model.parameters())}], lr=1e-2)
    data = Stage2Batches(load_curated_images(cfg.root, cfg.run), model.layout, encoder.preprocess, cfg)
    for micro in range(2):
        batch = data[micro]
        loss = objective(encoder(batch["pixels"]), batch["input_ids"], batch["attention_mask"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(torch.equal(llm_before[k], v) for k, v in model.language_model.state_dict().items())
    q_after = model.qformer.state_dict()
    assert not torch.equal(q_before["query_tokens"], q_after["query_tokens"])
    assert torch.equal(q_before["itm_head.weight"], q_after["itm_head.weight"])  # Stage 1 heads are not Stage 2's


def test_any_causal_lm_folder_with_an_eos_token_works_padding_with_eos(world, tmp_path):
    gpt2 = make_gpt2_without_pad(tmp_path / "gpt2")
    world_with_gpt2 = {**world, "gpt2": gpt2}
    result = train(config(world_with_gpt2, tmp_path / "out", llm="gpt2", steps=2, checkpoint_every=2))
    gen = Stage2Generator.from_checkpoint(result["checkpoint"], device="cpu")
    assert gen.model.tokenizer.pad_token_id == gen.model.tokenizer.eos_token_id
    assert gen.model.layout.prompt_ids("") == []  # GPT-2 adds no BOS: generation starts right after the queries
    captions = gen.caption(images(world, 2), max_new_tokens=5)
    assert len(captions) == 2 and captions == gen.caption(images(world, 2), max_new_tokens=5)


def test_recipe_defaults_follow_the_paper():
    cfg = Stage2Config(root="r", run="x", stage1="s", llm="l", out="o")
    assert (cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.weight_decay) == (1e-4, 5e-5, 2000, 0.05)
    assert lr_factor(cfg.steps, cfg) == pytest.approx(0.5)  # cosine to the 5e-5 floor
    with pytest.raises(ConfigError, match="--no-augment"):
        Stage2Config(root="r", run="x", stage1="s", llm="l", out="o", cache_features=True)


def test_a_resumed_run_reproduces_the_uninterrupted_run(world, trained, tmp_path):
    straight = world["base"] / "out-opt"
    interrupted = train(config(world, tmp_path / "resumed", stop_at=12))
    assert interrupted["step"] == 12
    resumed = train(config(world, tmp_path / "resumed"))
    assert resumed["step"] == 24 and losses(tmp_path / "resumed") == losses(straight)
    a = Blip2Stage2.from_pretrained(Path(trained["opt"]["checkpoint"]) / "model").trainable_state_dict()
    b = Blip2Stage2.from_pretrained(Path(resumed["checkpoint"]) / "model").trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((Path(resumed["checkpoint"]) / "stage2.json").read_text())
    assert saved["curated_run"]["run"] == "r1" and saved["vision"] == world["vision"]
    assert saved["lineage"]["run"] == "r1" and saved["lineage"]["curated_pairs"] == 32  # what data made it


def test_instruction_aware_qformer_reads_the_prompt(world, tmp_path):
    cfg = config(world, tmp_path, prompt="a photo of", instruction_aware=True, steps=2)
    model, encoder, _ = build_model(cfg, torch.device("cpu"))
    model.eval()
    feats = encoder(Stage2Generator(model, encoder).pixels(images(world, 2)))
    with torch.no_grad():
        a = model.soft_prompt(feats, ["a photo of", "a photo of"])
        b = model.soft_prompt(feats, ["what color is it?", "a photo of"])
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)  # padding is masked
    assert model.qformer.embeddings.word_embeddings.weight.requires_grad
    result = train(cfg)
    with pytest.raises(ConfigError, match="InstructBLIP"):
        export_blip2(result["checkpoint"], tmp_path / "hf")


@pytest.mark.slow
def test_the_soft_prompt_carries_the_image_captions_name_each_images_color_and_shape(world, tmp_path):
    """Four images, one caption each, a T5 that learnt to read its encoder: after Stage 2 the
    frozen LLM says what is in each image, which only the soft prompt can tell it."""
    t5 = make_t5(tmp_path / "t5", width=64, pretrain_steps=400)
    make_curated_run(tmp_path / "data", "r4", images=4, seed=3, captions_per_image=1)
    cfg = config(world, tmp_path / "out", root=str(tmp_path / "data"), run="r4", llm="t5", steps=1000, batch_size=4,
                 warmup_steps=10, lr=3e-3, checkpoint_every=1000)
    cfg.llm = t5
    result = train(cfg)
    gen = Stage2Generator.from_checkpoint(result["checkpoint"], device="cpu")
    pictures = load_curated_images(str(tmp_path / "data"), "r4")
    captions = gen.caption([p.image for p in pictures], max_new_tokens=40)
    truths = [p.captions[0] for p in pictures]
    # size, color and shape right; a caption that ignored the image could be right for one image only
    right = [c.split()[1:4] == t.split()[1:4] for c, t in zip(captions, truths)]
    assert sum(right) >= 3, (captions, truths)


# -- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_generation_is_deterministic_and_sampling_depends_only_on_image_and_seed(trained, world, llm):
    gen = Stage2Generator.from_checkpoint(trained[llm]["checkpoint"], device="cpu")
    pics = images(world, 3)
    beams = gen.caption(pics, prompt="a photo of")
    assert beams == gen.caption(pics, prompt="a photo of") and all(isinstance(c, str) for c in beams)
    sampled = gen.caption(pics, top_p=0.9, seed=3)
    assert sampled == gen.caption(pics, top_p=0.9, seed=3)
    assert gen.caption(pics[2:], top_p=0.9, seed=3, first_index=2) == sampled[2:]
    # questions of different lengths are padded (left for decoder-only): each answer is the one it gets alone
    questions = ["what color?", "what color is the shape in the middle of the picture?"]
    together = gen.answer(pics[:2], questions)
    assert together == [gen.answer([p], [q])[0] for p, q in zip(pics[:2], questions)]


def test_a_transformers_blip2_checkpoint_loads_and_generates_what_transformers_generates(world, tmp_path):
    """Import: Blip2ForConditionalGeneration's vision_model / qformer / query_tokens /
    language_projection / language_model land in capfilt's places (a model capfilt did not write)."""
    import io

    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from model.captioners import save_random_captioner

    folder = save_random_captioner(str(tmp_path / "blip2"), "blip-2", image_size=32)
    ours = Stage2Generator.from_checkpoint(folder, device="cpu")
    hf = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)
    pics = images(world, 2)
    inputs = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in pics], text=["a photo of"] * 2,
                       return_tensors="pt")
    with torch.no_grad():
        theirs = hf.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=6)[:, inputs["input_ids"].shape[1]:]
    mine = ours.generate_ids(pics, ["a photo of"] * 2, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert mine == theirs.tolist()


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_exported_blip2_generates_the_same_tokens_in_plain_transformers(trained, world, tmp_path, llm):
    import io

    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = export_blip2(trained[llm]["checkpoint"], tmp_path / "hf")
    ours = Stage2Generator.from_checkpoint(trained[llm]["checkpoint"], device="cpu")
    hf = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    pics = images(world, 3)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in pics]
    eos, pad = ours.model.layout.eos, ours.model.layout.pad
    for prompt in ("", "a photo of"):
        for beams in (1, 3):
            mine = ours.generate_ids(pics, [prompt] * 3, num_beams=beams, max_new_tokens=12)
            inputs = processor(images=pil, text=[prompt] * 3, return_tensors="pt")
            with torch.no_grad():
                theirs = hf.generate(**inputs, num_beams=beams, max_new_tokens=12, min_new_tokens=1)
            if hf.config.use_decoder_only_language_model:
                theirs = theirs[:, inputs["input_ids"].shape[1]:]
            else:
                theirs = theirs[:, 1:]  # the decoder start token
            theirs = [[t for t in (row[: row.index(eos)] if eos in row else row) if t != pad] for row in theirs.tolist()]
            assert mine == theirs, (prompt, beams)
    # and back: the exported folder loads as a capfilt generator with the same output
    again = Stage2Generator.from_checkpoint(out, device="cpu")
    assert again.caption(pics, prompt="a photo of", max_new_tokens=12) == ours.caption(pics, prompt="a photo of", max_new_tokens=12)


def test_export_needs_a_blip2_vision_encoder(trained, world, tmp_path):
    clip = make_clip_vision(tmp_path / "clip")
    with pytest.raises(ConfigError, match="not a Blip2VisionModel"):
        export_blip2(trained["opt"]["checkpoint"], tmp_path / "hf", vision=clip)
    with pytest.raises(ConfigError, match="not a Blip2VisionModel"):
        export_blip2(trained["opt"]["checkpoint"], tmp_path / "hf", vision="open_clip:ViT-B-32")


# -- the Caption stage --------------------------------------------------------------------------
def test_a_stage2_checkpoint_captions_through_the_caption_stage(trained, world, tmp_path):
    import pyarrow as pa

    from pipeline.caption import assemble_shard, caption_batch
    from pipeline.run_store import RunStore

    out = world["base"] / "out-opt"
    captioner = load_captioner(str(out), device="cpu")  # the trainer folder: no registration needed
    assert load_captioner(str(Path(trained["opt"]["checkpoint"]) / "model"), device="cpu").id.endswith("model")
    rows = image_rows("s", 3, size=32)
    decoding = Decoding(num_captions=2, max_length=8, min_length=2, seed=5)
    batch = pa.Table.from_pylist([{"sample_id": r["sample_id"], "image": r["image"]} for r in rows])
    result = caption_batch(batch, captioner, decoding)
    assert [len(r["captions"]) for r in result.to_pylist()] == [2, 2, 2]
    alone = caption_batch(batch.slice(1, 1), captioner, decoding).to_pylist()[0]
    assert alone["captions"] == result.to_pylist()[1]["captions"]  # image + seed decide, not the batch
    store = RunStore(str(tmp_path), "r")
    commit_image_shards(store, {"s": 3}, seed=0)
    images_table = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "key", "url", "caption", "image", "image_format",
                                                              "width", "height")} for r in rows])
    captions, rejected, counts = assemble_shard("s", images_table, result, str(out), decoding)
    assert counts.rows_in == 3 and captions.num_rows >= 3


# -- CLI ----------------------------------------------------------------------------------------
def test_cli_trains_stage2_and_generates_one_line_per_image(world, tmp_path, capsys):
    out = tmp_path / "cli"
    cli_main(["train", "stage2", "--root", world["root"], "--run", "r1", "--stage1", world["stage1"], "--llm", world["opt"],
              "--out", str(out), "--steps", "6", "--batch-size", "8", "--warmup-steps", "1", "--lr", "2e-3",
              "--min-lr", "1e-4", "--no-augment", "--log-every", "1", "--device", "cpu"])
    assert "trained to step 6" in capsys.readouterr().out
    paths = []
    for i, data in enumerate(images(world, 2)):
        paths.append(tmp_path / f"img{i}.jpg")
        paths[-1].write_bytes(data)
    cli_main(["generate", "--stage2", str(out), str(paths[0]), str(paths[1]), "--device", "cpu", "--llm", world["opt"]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    with pytest.raises(SystemExit) as exit_info:  # the old spellings (--checkpoint, --images) still parse
        cli_main(["generate", "--checkpoint", str(tmp_path), "--images", str(paths[0])])
    assert exit_info.value.code == 2 and "capfilt: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ray_train_workers_train_one_model_and_rank0_checkpoints(world, tmp_path, ray_local):
    from model.stage2 import train_distributed

    cfg = config(world, tmp_path / "ddp", steps=3, batch_size=4, checkpoint_every=3)
    result = train_distributed(cfg, workers=2, use_gpu=False)
    assert result["step"] == 3 and [m["step"] for m in result["metrics"]] == [1, 2, 3]
    assert all(m["samples_per_s"] > 0 and m["loss"] > 0 for m in result["metrics"])
    loaded = Blip2Stage2.from_pretrained(Path(result["checkpoint"]) / "model")
    assert loaded.config.llm == str(Path(world["opt"]).resolve())
