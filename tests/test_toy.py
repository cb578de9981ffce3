"""The toy preset: pieces trained from scratch load through the same calls as real checkpoints."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from capfilt.errors import ConfigError
from model.toy.clip import pretrain_clip
from model.toy.lm import pretrain_lm
from model.toy.preset import ToyPreset
from model.toy.scenes import ATTRIBUTE_VALUES, render, true_caption, web_caption
from model.toy.tokenizer import train_text_tokenizer
from stage1_world import jpeg, scenes

# Few steps: enough to show learning in seconds, not the demo's quality.
PRESET = ToyPreset(clip_steps=150, lm_steps=60)


@pytest.fixture(scope="module")
def pairs():
    """360 scenes: 300 with web-style captions to train on, 60 held out with their true captions."""
    rng = np.random.default_rng(11)
    world = scenes(360, seed=11)
    rows = [(jpeg(render(attrs, 32, rng)), web_caption(attrs, rng), true_caption(attrs)) for attrs in world]
    return {"train": [(img, web) for img, web, _ in rows[:300]], "held": [(img, true) for img, _, true in rows[300:]]}


@pytest.fixture(scope="module")
def toy_clip(pairs, tmp_path_factory):
    return pretrain_clip(pairs["train"], tmp_path_factory.mktemp("clip"), PRESET, eval_pairs=pairs["held"])


def test_tokenizer_loads_as_the_qformer_tokenizer_with_dec(tmp_path, pairs):
    from model.qformer import DEC_TOKEN, load_tokenizer

    folder = train_text_tokenizer([text for _, text in pairs["train"]], tmp_path / "tok")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.bos_token == DEC_TOKEN and DEC_TOKEN in tokenizer.get_vocab()
    ids = tokenizer("A Large RED Circle in the middle").input_ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    # every word of the world is in the vocabulary (lowercased), so nothing becomes [UNK]
    words = [w for values in ATTRIBUTE_VALUES.values() for w in values]
    assert tokenizer.unk_token_id not in tokenizer(" ".join(words)).input_ids


def test_bert_learns_masked_words_and_initialises_the_toy_presets_qformer(tmp_path, pairs):
    """The toy's bert-base: masked-LM loss falls, and the toy preset's Stage 1 loads it as BLIP-2
    loads bert-base-uncased (every self-attention and feed-forward weight copied, sizes equal)."""
    from capfilt.presets import toy_preset
    from model.factory import create
    from model.qformer import init_from_bert, load_tokenizer, tokenizer_fields
    from model.toy.bert import pretrain_bert

    texts = [text for _, text in pairs["train"]]
    tok = train_text_tokenizer(texts, tmp_path / "tok")
    metrics = pretrain_bert(texts, tmp_path / "bert", tok, ToyPreset(bert_steps=160))
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"], metrics
    stage1 = toy_preset(str(tmp_path)).stage1.values
    assert stage1["config.bert"] == f"{tmp_path}/bert"
    model = create(stage1["config.model"], **tokenizer_fields(load_tokenizer(tok)), vision_width=64)
    before = model.qformer.encoder.layer[0].attention.attention.query.weight.clone()
    missing = init_from_bert(model, tmp_path / "bert")
    assert not torch.equal(before, model.qformer.encoder.layer[0].attention.attention.query.weight)
    assert all("crossattention" in k or not k.startswith("qformer.encoder") for k in missing), missing


def test_clip_retrieval_beats_chance_on_held_out_pairs(toy_clip):
    metrics = toy_clip.metrics
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"]
    # 60 held-out images with captions never seen in training: chance is 1/60
    assert metrics["eval"]["image_to_text_top1"] > 6 * metrics["eval"]["chance"]
    assert metrics["eval"]["text_to_image_top1"] > 6 * metrics["eval"]["chance"]


def test_clip_loads_as_filter_scorer_and_as_frozen_stage1_encoder(toy_clip, pairs):
    from PIL import Image
    import io

    from model.vision import load_vision_encoder

    scorer = toy_clip.load_scorer()  # register_clip_config + load_clip(name, checkpoint)
    image, caption = pairs["held"][0]
    wrong = pairs["held"][1][1]
    image_emb = scorer.embed_images([Image.open(io.BytesIO(image))])
    text_emb = scorer.embed_texts([caption, wrong, ""])
    assert image_emb.shape == (1, PRESET.clip_embed_dim) and np.allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)

    pixels = torch.randn(2, 3, PRESET.image_size, PRESET.image_size)
    by_dir = load_vision_encoder(toy_clip.local_vision_spec)
    by_name = load_vision_encoder(toy_clip.vision_spec)
    tokens = by_dir.tokens(pixels)
    patches = (PRESET.image_size // PRESET.patch_size) ** 2
    assert tokens.shape == (2, patches + 1, PRESET.clip_width)
    assert torch.equal(tokens, by_name.tokens(pixels))
    assert not any(p.requires_grad for p in by_dir.parameters())
    # the frozen encoder is the trained one, not a fresh random tower
    assert torch.equal(by_dir.visual.conv1.weight, scorer.model.visual.conv1.weight)


def test_lm_learns_the_captions_and_loads_as_a_causal_lm(tmp_path, pairs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [text for _, text in pairs["train"]]
    lm = pretrain_lm(texts + ["", "   "], tmp_path / "lm", PRESET, eval_texts=[t for _, t in pairs["held"]])
    assert lm.metrics["texts"] == len(texts)  # the empty ones carry no tokens
    assert lm.metrics["loss_last"] < 0.5 * lm.metrics["loss_first"]
    assert lm.metrics["eval"]["loss"] < 0.5 * lm.metrics["loss_first"]

    tokenizer = AutoTokenizer.from_pretrained(lm.folder)
    model = AutoModelForCausalLM.from_pretrained(lm.folder).eval()
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("a small").input_ids[0] == tokenizer.bos_token_id  # OPT's convention
    out = model.generate(**tokenizer(["a"], return_tensors="pt"), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    generated = tokenizer.decode(out[0], skip_special_tokens=True).split()
    assert any(word in ATTRIBUTE_VALUES["shape"] + ATTRIBUTE_VALUES["color"] for word in generated)


def test_lm_training_is_deterministic(tmp_path, pairs):
    texts = [text for _, text in pairs["train"][:100]]
    preset = ToyPreset(lm_steps=10)
    first = pretrain_lm(texts, tmp_path / "a", preset)
    second = pretrain_lm(texts, tmp_path / "b", preset)
    assert first.metrics["loss_last"] == second.metrics["loss_last"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bad_inputs_name_the_problem(tmp_path, pairs):
    with pytest.raises(ConfigError, match="at least 2"):
        pretrain_clip(pairs["train"][:1], tmp_path / "c1")
    with pytest.raises(ConfigError, match="pair 1 has image bytes"):
        pretrain_clip([pairs["train"][0], (b"not an image", "x")], tmp_path / "c2", ToyPreset(clip_steps=1))
    with pytest.raises(ConfigError, match="no non-empty texts"):
        pretrain_lm(["", None], tmp_path / "lm")
    with pytest.raises(ConfigError, match="clip_layers"):
        ToyPreset(clip_layers=1)


def write_images_run(root, run: str, rows: list[dict]) -> None:
    import pyarrow as pa

    from pipeline.run_store import RunStore, ShardCounts
    from schemas import IMAGES

    table = pa.Table.from_pylist([{"sample_id": f"src/{i}", "url": f"http://127.0.0.1:1/{i}.jpg", **r}
                                  for i, r in enumerate(rows)])
    RunStore(str(root), run).commit_shard("ingest", "00000", "h", outputs={"images": (IMAGES, table)},
                                          counts=ShardCounts(rows_in=len(rows), kept=len(rows)))


def test_pretrain_toy_reads_an_ingested_run_counts_what_it_leaves_out_and_resumes(tmp_path, pairs):
    from model.toy.pretrain import TOY_DONE, pretrain_toy, run_pairs

    rows = [{"image": img, "caption": cap, "sha256": f"h{i}"} for i, (img, cap) in enumerate(pairs["train"][:40])]
    rows += [{"image": rows[0]["image"], "caption": "same bytes", "sha256": "h0"},  # exact duplicate
             {"image": pairs["train"][41][0], "caption": "  ", "sha256": "e"},  # empty caption
             {"image": b"not an image", "caption": "a red circle", "sha256": "x"}]  # undecodable
    write_images_run(tmp_path, "raw", rows)
    preset = ToyPreset(clip_steps=5, lm_steps=5, bert_steps=5, clip_batch_size=16, lm_batch_size=8)
    info = pretrain_toy(str(tmp_path), "raw", tmp_path / "toy", preset)
    assert info["counts"] == {"images": 43, "duplicates": 1, "empty_caption": 1, "undecodable": 1, "pairs": 40}
    assert not info["reused"] and (tmp_path / "toy" / TOY_DONE).exists()
    # with a core to spare the LM trains in a second process, and is the LM this process trains
    if len(os.sched_getaffinity(0)) >= 2:
        assert info["lm"]["process"] == "beside the CLIP's"
    texts = [caption for _, caption in run_pairs(str(tmp_path), "raw")[0]]
    pretrain_lm(texts, tmp_path / "lm-here", preset)
    assert ((tmp_path / "lm-here" / "model.safetensors").read_bytes()
            == (tmp_path / "toy" / "lm" / "model.safetensors").read_bytes())
    for part in ("tokenizer", "bert", "clip", "lm"):
        assert (tmp_path / "toy" / part).is_dir()
    from model.vision import load_vision_encoder

    assert load_vision_encoder(f"open_clip:local-dir:{tmp_path / 'toy' / 'clip'}") is not None
    assert pretrain_toy(str(tmp_path), "raw", tmp_path / "toy", preset)["reused"]
    # another preset is not the same folder's content: what it changes is trained again, the rest kept
    other_clip = ToyPreset(clip_steps=6, lm_steps=5, bert_steps=5, clip_batch_size=16, lm_batch_size=8)
    lm_before = (tmp_path / "toy" / "lm" / "model.safetensors").read_bytes()
    info = pretrain_toy(str(tmp_path), "raw", tmp_path / "toy", other_clip)
    assert not info["reused"] and info["kept"] == ["lm"] and info["clip"]["steps"] == 6
    assert (tmp_path / "toy" / "lm" / "model.safetensors").read_bytes() == lm_before
    clip_before = (tmp_path / "toy" / "clip" / "open_clip_model.safetensors").read_bytes()
    info = pretrain_toy(str(tmp_path), "raw", tmp_path / "toy", replace(other_clip, lm_steps=6))
    assert info["kept"] == ["tokenizer+bert+clip"] and info["lm"]["steps"] == 6
    assert (tmp_path / "toy" / "clip" / "open_clip_model.safetensors").read_bytes() == clip_before
    assert (tmp_path / "toy" / "lm" / "model.safetensors").read_bytes() != lm_before


def test_pretrain_toy_stage1_is_a_stage1_of_no_run_and_retrains_alone(tmp_path, pairs):
    """stage1_steps: a Stage 1 pretrained on the CLIP's pairs (the filter's start, model/toy/stage1.py);
    changing its settings retrains it alone, changing the others keeps it."""
    from model.finetune import fold_config
    from model.stage1_inference import stage1_checkpoint
    from model.toy.pretrain import pretrain_toy

    rows = [{"image": img, "caption": cap, "sha256": f"h{i}"} for i, (img, cap) in enumerate(pairs["train"][:40])]
    write_images_run(tmp_path, "raw", rows)
    preset = ToyPreset(clip_steps=5, lm_steps=5, bert_steps=5, clip_batch_size=16, lm_batch_size=8, stage1_steps=3)
    toy = tmp_path / "toy"
    info = pretrain_toy(str(tmp_path), "raw", toy, preset)
    assert (info["stage1"]["steps"], info["stage1"]["pairs"]) == (3, 40) and info["stage1"]["loss_last"] > 0
    checkpoint = stage1_checkpoint(toy / "stage1", "the toy Stage 1")
    assert checkpoint.info["config"]["run"] == "" and checkpoint.info["lineage"]["pairs"] == 40
    assert checkpoint.info["config"]["vision"] == f"open_clip:local-dir:{toy / 'clip'}"
    # --folds retrains a Stage 1's run without each fold: this one trained on no run, and it says so
    with pytest.raises(ConfigError, match="pretrained on pairs of no curated run"):
        fold_config(str(toy / "stage1"), 0, 2, str(tmp_path / "fold"))
    clip_before = (toy / "clip" / "open_clip_model.safetensors").read_bytes()
    info = pretrain_toy(str(tmp_path), "raw", toy, replace(preset, stage1_steps=2))
    assert info["kept"] == ["tokenizer+bert+clip", "lm"] and info["stage1"]["steps"] == 2
    assert stage1_checkpoint(toy / "stage1", "the toy Stage 1").info["step"] == 2  # trained anew, not resumed at 3
    info = pretrain_toy(str(tmp_path), "raw", toy, replace(preset, stage1_steps=2, lm_steps=6))
    assert info["kept"] == ["tokenizer+bert+clip", "stage1"] and info["stage1"]["steps"] == 2
    assert (toy / "clip" / "open_clip_model.safetensors").read_bytes() == clip_before
    # asking for none keeps the one there (the bootstrap flow trains the other pieces first, then the
    # Stage 1 in a step of its own: a rerun's first step must not undo it), and asking for it again reuses it
    trained = (toy / "stage1" / "metrics.jsonl").stat().st_mtime_ns
    info = pretrain_toy(str(tmp_path), "raw", toy, replace(preset, stage1_steps=0, lm_steps=6))
    assert info["kept"] == ["tokenizer+bert+clip", "lm", "stage1"] and info["stage1"]["steps"] == 2
    info = pretrain_toy(str(tmp_path), "raw", toy, replace(preset, stage1_steps=2, lm_steps=6))
    assert info["kept"] == ["tokenizer+bert+clip", "lm", "stage1"] and info["stage1"]["steps"] == 2
    assert stage1_checkpoint(toy / "stage1", "the toy Stage 1").info["step"] == 2
    assert (toy / "stage1" / "metrics.jsonl").stat().st_mtime_ns == trained  # not trained again
    with pytest.raises(ConfigError, match="stage1_steps must be >= 0"):
        ToyPreset(stage1_steps=-1)


def test_toy_pretrain_cli_names_a_run_without_images_or_pairs(tmp_path, capsys):
    from capfilt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["toy", "pretrain", "--root", str(tmp_path), "--run", "nothing", "--out", str(tmp_path / "toy")])
    assert exc.value.code == 2 and "has no images/" in capsys.readouterr().err
    write_images_run(tmp_path, "one", [{"image": jpeg(render(dict(scenes(1, seed=0)[0]), 32, np.random.default_rng(0))),
                                        "caption": "a red circle", "sha256": "a"}])
    with pytest.raises(SystemExit) as exc:
        main(["toy", "pretrain", "--root", str(tmp_path), "--run", "one", "--out", str(tmp_path / "toy")])
    assert exc.value.code == 2 and "1 usable (image, caption) pairs" in capsys.readouterr().err


def _world_pretrain_argv(tmp_path, monkeypatch, world_images: int) -> list[str]:
    """`capfilt toy pretrain --quick --world-images N` argv, --quick made a few steps of each piece."""
    import model.toy.preset as toy

    small = ToyPreset(clip_steps=3, lm_steps=3, bert_steps=3, clip_batch_size=8, lm_batch_size=8)
    monkeypatch.setattr(toy.ToyPreset, "quick", classmethod(lambda cls, **kw: replace(small, **kw)))
    return ["toy", "pretrain", "--root", str(tmp_path), "--run", "no-such-run", "--out", str(tmp_path / "toy"),
            "--quick", "--world-images", str(world_images)]


def test_toy_pretrain_on_a_separate_world_never_reads_the_run(tmp_path, monkeypatch):
    """--world-images: the frozen pieces learn from a pretraining world made once under the root."""
    import json

    from capfilt.cli import main
    from model.toy.pretrain import TOY_DONE

    argv = _world_pretrain_argv(tmp_path, monkeypatch, 24)
    main(argv)
    info = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    world = tmp_path / "worlds" / "toy-pretrain-24-noise0.4-seed104729-described"
    assert info["world"] == str(world) and (world / "world.json").exists()
    # the web pairs (empty captions left out) and the described images, once each, for the CLIP;
    # every wording of the described images for the text pieces
    assert info["counts"]["pairs"] >= 24 * 0.85 + 2
    assert info["counts"]["texts"] == info["counts"]["pairs"] + 2 * 4
    vocab = json.loads((tmp_path / "toy" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"backdrop", "sits", "colored"} & set(vocab)  # words only the described images' captions use
    assert not (tmp_path / "runs").exists()  # the run was never read
    for part in ("tokenizer", "bert", "clip", "lm"):
        assert (tmp_path / "toy" / part).is_dir()
    before = (tmp_path / "toy" / "clip" / "open_clip_model.safetensors").read_bytes()
    main(argv)  # rerun: reused, not retrained
    assert (tmp_path / "toy" / "clip" / "open_clip_model.safetensors").read_bytes() == before


def test_toy_pretrain_stage2_learns_the_worlds_uncorrupted_pairs_from_its_stage1(tmp_path, monkeypatch):
    """--stage2-steps: a Stage 2 (the captioner's start, model/toy/stage2.py) from the pretrained Stage 1,
    on the pairs the world did not corrupt; a step asking for neither Stage keeps both, and another
    Stage 1 retrains the Stage 2 too."""
    import json

    from capfilt.cli import main
    from model.captioners import load_captioner
    from model.toy.pretrain import TOY_DONE
    from model.toy.world import described_pairs, world_pairs

    argv = _world_pretrain_argv(tmp_path, monkeypatch, 30)
    main([*argv, "--stage1-steps", "2", "--stage2-steps", "3"])
    info = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    world = info["world"]
    clean = world_pairs(world, clean=True)
    assert 0 < len(clean) < len(world_pairs(world))  # the corrupted ones are left out
    assert info["stage2"]["pairs"] == info["counts"]["clean_pairs"] == len(clean) + len(described_pairs(world))
    assert info["stage2"]["steps"] == 3 and info["stage2"]["settings"]["stage1"] == info["stage1"]["settings"]
    lineage = json.loads((tmp_path / "toy" / "stage2" / "lineage.json").read_text())
    assert lineage["pairs"] == info["stage2"]["pairs"]
    load_captioner(str(tmp_path / "toy" / "stage2"), "cpu")  # what `finetune captioner --stage2` and `caption` load
    trained = (tmp_path / "toy" / "stage2" / "metrics.jsonl").stat().st_mtime_ns
    main(argv)  # the flow's first step asks for neither: both kept
    info = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    assert {"stage1", "stage2"} <= set(info["kept"]) and info["stage2"]["steps"] == 3
    main([*argv, "--stage1-steps", "2", "--stage2-steps", "3"])  # asked again: reused as is
    assert (tmp_path / "toy" / "stage2" / "metrics.jsonl").stat().st_mtime_ns == trained
    main([*argv, "--stage1-steps", "3", "--stage2-steps", "3"])  # another Stage 1: its Stage 2 is trained anew
    info = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    assert "stage2" not in info["kept"] and info["stage2"]["settings"]["stage1"]["stage1_steps"] == 3
    assert (tmp_path / "toy" / "stage2" / "metrics.jsonl").stat().st_mtime_ns != trained


def test_toy_pretrain_stage2_needs_a_stage1(tmp_path, monkeypatch, capsys):
    from capfilt.cli import main

    argv = _world_pretrain_argv(tmp_path, monkeypatch, 20)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--stage2-steps", "3"])
    assert exit_info.value.code == 2
    assert "--stage2-steps needs --stage1-steps" in capsys.readouterr().err
    assert not (tmp_path / "toy").exists()


def test_toy_pretrain_clip_on_its_own_larger_world(tmp_path, monkeypatch):
    """--clip-world-images: the CLIP learns from a larger pretraining world, the text pieces from
    --world-images'; a folder made without it is not reused for it, nor the other way round."""
    import json

    from capfilt.cli import main
    from model.toy.pretrain import TOY_DONE

    argv = _world_pretrain_argv(tmp_path, monkeypatch, 20)
    main(argv)
    same = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    assert same["clip_world"] is None and same["clip"]["pairs"] == same["counts"]["pairs"]
    main([*argv, "--clip-world-images", "60"])
    info = json.loads((tmp_path / "toy" / TOY_DONE).read_text())
    clip_world = tmp_path / "worlds" / "toy-pretrain-60-noise0.4-seed104729-described"
    assert info["world"] == same["world"] and info["clip_world"] == str(clip_world)
    assert info["clip"]["pairs"] == info["counts"]["clip_pairs"] >= 60 * 0.85 + 6 > info["counts"]["pairs"]
    assert info["counts"]["texts"] == same["counts"]["texts"]  # the text pieces read the smaller world only
    main(argv)  # back to one world: the CLIP of the larger one is not reused
    assert json.loads((tmp_path / "toy" / TOY_DONE).read_text())["clip_world"] is None


def test_toy_pretrain_clip_world_needs_a_world(tmp_path, capsys):
    from capfilt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["toy", "pretrain", "--root", str(tmp_path), "--run", "r", "--out", str(tmp_path / "toy"),
              "--clip-world-images", "60"])
    assert exc.value.code == 2 and "--clip-world-images needs --world-images" in capsys.readouterr().err
