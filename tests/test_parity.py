"""Reference parity: `--recipe lavis` computes what salesforce/LAVIS computes.

The reference below is written from LAVIS's published math (blip2_qformer.py's forward, read,
not copied): ITC over a gathered batch that carries no gradient, ITM with one hard negative per
row drawn row by row from softmax(similarity) with the positives at -10000, pairs in LAVIS's
order, ITG with [DEC] as BOS and padding ids ignored. It uses the Q-Former's parameters but its
own wiring (masks, gathers, sampling, pair layout, loss reductions), so a change in any of
capfilt's loss code shows up here. Tiny config, dropout off, CPU fp32.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

from model.losses import stage1_losses
from model.qformer import QFormer, QFormerConfig
from model.recipes import STAGE1, STAGE2, lr_factor, pre_caption
from model.train_stage1 import Stage1Config, train

LOSS_TOL = 1e-6
GRAD_TOL = 1e-4  # relative, per parameter tensor

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            cross_attention_frequency=1, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_query_tokens=4, embed_dim=16, vision_width=24, max_text_length=12,
            pad_token_id=0, cls_token_id=2, dec_token_id=39,
            # At BERT's 0.02 a random tiny Q-Former gives every sample nearly the same features, and
            # the ITC gradient becomes a difference of near-equal terms that fp32 resolves only to
            # ~1e-3 relative (fp64 agrees to 1e-12); a wider init makes the samples differ.
            initializer_range=0.3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inputs(batch=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 5, TINY["vision_width"], generator=g)
    ids = torch.randint(5, 39, (batch, length), generator=g)
    ids[:, 0] = TINY["cls_token_id"]
    lengths = torch.randint(4, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, TINY["pad_token_id"])
    return features, ids, mask, torch.arange(batch)


def model(seed=0) -> QFormer:
    torch.manual_seed(seed)
    m = QFormer(QFormerConfig(**TINY))
    with torch.no_grad():  # a temperature away from init so its gradient is not special
        m.temp.fill_(0.1)
    return m.train()


# -- the reference, from LAVIS's math -------------------------------------------------------------

def _run(m, embeds, allowed, query_length, image=None):
    return m.qformer(query_embeds=embeds, query_length=query_length, attention_mask=allowed[:, None],
                     encoder_hidden_states=image).last_hidden_state


def lavis_losses(m: QFormer, features, ids, mask, generator, itc_gather_grad=False):
    """LAVIS Blip2Qformer.forward's three losses on one process of a distributed run.

    itc_gather_grad=True is the same math with a gather that keeps the gradient (what no LAVIS
    run does; used to show the switch changes the gradient and nothing else)."""
    cfg = m.config
    with torch.no_grad():
        m.temp.clamp_(0.001, 0.5)
    B, T, Q = ids.shape[0], ids.shape[1], cfg.num_query_tokens
    image_embeds = F.layer_norm(features, (cfg.vision_width,), m.ln_vision.weight, m.ln_vision.bias,
                                cfg.vision_layer_norm_eps)
    queries = m.query_tokens.expand(B, -1, -1)
    query_out = _run(m, m.embeddings(query_embeds=queries), torch.ones(B, Q, Q, dtype=torch.bool), Q, image_embeds)
    image_feats = F.normalize(m.vision_projection(query_out), dim=-1)
    text_out = _run(m, m.embeddings(input_ids=ids), mask.bool()[:, None, :].expand(B, T, T), 0)
    text_feat = F.normalize(m.text_projection(text_out[:, 0, :]), dim=-1)

    # ITC: concat_all_gather has no gradient (one rank: the gathered batch is this batch, detached)
    image_all = image_feats if itc_gather_grad else image_feats.detach()
    text_all = text_feat if itc_gather_grad else text_feat.detach()
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_all.unsqueeze(-1)).squeeze(-1)  # (B, N, Q)
    sim_i2t = sim_q2t.max(-1).values / m.temp
    sim_t2q = torch.matmul(text_feat[:, None, None, :], image_all.permute(0, 2, 1)).squeeze(-2)  # (B, N, Q)
    sim_t2i = sim_t2q.max(-1).values / m.temp
    targets = torch.arange(B)
    loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

    # ITM: one hard negative per row, drawn row by row, negative image for each text first
    with torch.no_grad():
        weights_t2i = F.softmax(sim_t2i.detach().clone().fill_diagonal_(-10000), dim=1)
        weights_i2t = F.softmax(sim_i2t.detach().clone().fill_diagonal_(-10000), dim=1)
    neg_image = [int(torch.multinomial(weights_t2i[b], 1, generator=generator)) for b in range(B)]
    neg_text = [int(torch.multinomial(weights_i2t[b], 1, generator=generator)) for b in range(B)]
    image_embeds_neg = image_embeds[neg_image]  # all_gather_with_grad: this rank's slice keeps its gradient
    text_ids_all = torch.cat([ids, ids, ids[neg_text]])
    text_atts_all = torch.cat([mask, mask, mask[neg_text]])
    image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds])
    itm_queries = m.query_tokens.expand(3 * B, -1, -1)
    keys = torch.cat([torch.ones(3 * B, Q, dtype=torch.long), text_atts_all], dim=1).bool()
    hidden = _run(m, m.embeddings(input_ids=text_ids_all, query_embeds=itm_queries),
                  keys[:, None, :].expand(-1, Q + T, -1), Q, image_embeds_all)
    logits = m.itm_head(hidden[:, :Q, :]).mean(dim=1)
    itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    loss_itm = F.cross_entropy(logits, itm_labels)

    # ITG: [DEC] as BOS, padding ids ignored; text sees every query and the text before it
    dec = ids.clone()
    dec[:, 0] = cfg.dec_token_id
    labels = dec.masked_fill(dec == cfg.pad_token_id, -100)
    allowed = torch.zeros(B, Q + T, Q + T, dtype=torch.bool)
    allowed[:, :, :Q] = True
    allowed[:, Q:, Q:] = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    hidden = _run(m, m.embeddings(input_ids=dec, query_embeds=queries), allowed, Q, image_embeds)
    scores = m.lm_head(hidden[:, Q:, :])
    loss_itg = F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), labels[:, 1:].reshape(-1),
                               label_smoothing=0.1)
    return {"itc": loss_itc, "itm": loss_itm, "itg": loss_itg, "total": loss_itc + loss_itm + loss_itg,
            "negatives": (neg_image, neg_text)}


def grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g[k].flatten() for k in sorted(g)])


# -- the parity test ------------------------------------------------------------------------------

def test_lavis_recipe_stage1_losses_and_gradients_match_the_lavis_reference():
    features, ids, mask, image_ids = inputs()
    ours_model = model()
    ref_model = copy.deepcopy(ours_model)
    itc_local = STAGE1["lavis"].itc_gather_grad == "local"
    ours = stage1_losses(ours_model, features, ids, mask, image_ids, 0.1, 0.1,
                         torch.Generator().manual_seed(5), itc_local_grad=itc_local)
    ref = lavis_losses(ref_model, features, ids, mask, torch.Generator().manual_seed(5))
    ours.total.backward()
    ref["total"].backward()

    diffs = {k: abs(float(getattr(ours, k).detach()) - float(ref[k].detach())) for k in ("itc", "itm", "itg", "total")}
    assert max(diffs.values()) < LOSS_TOL, diffs
    mine, theirs = grads(ours_model), grads(ref_model)
    assert mine.keys() == theirs.keys()
    # Attention key biases have a zero gradient in exact arithmetic (softmax ignores a shift):
    # both sides must be ~0 there, and the relative test applies to every other tensor.
    scale = float(flat(theirs).norm())
    key_bias = [k for k in theirs if k.endswith("key.bias")]
    assert key_bias and all(max(float(mine[k].norm()), float(theirs[k].norm())) < 1e-5 * scale for k in key_bias)
    rel = {k: float((mine[k] - theirs[k]).norm() / theirs[k].norm()) for k in theirs if k not in key_bias}
    worst = max(rel, key=rel.get)
    assert rel[worst] < GRAD_TOL, (worst, rel[worst])
    overall = float((flat(mine) - flat(theirs)).norm()) / scale
    print(f"\nparity: loss diffs {({k: f'{v:.1e}' for k, v in diffs.items()})}, max relative grad diff "
          f"{rel[worst]:.2e} ({worst}), overall {overall:.2e}")


def test_paper_and_lavis_itc_gradients_differ_and_only_the_gradient():
    """The switch is real: the same ITC loss value, a different gradient (paper = the full
    gradient of the loss; lavis = the gradient with the gathered side stopped)."""
    from model.losses import itc_loss

    features, ids, mask, _ = inputs()
    results = {}
    for name in ("paper", "lavis"):
        m = model()
        tokens = m.prepare_image(features)
        image_feats = F.normalize(m.vision_projection(m.query_output(tokens)), dim=-1)
        loss = itc_loss(image_feats, m.text_features(ids, mask), m.temp, 0.1,
                        local_grad=STAGE1[name].itc_gather_grad == "local").loss
        loss.backward()
        results[name] = (float(loss.detach()), flat(grads(m)))
    full = model()
    lavis_losses(full, features, ids, mask, torch.Generator().manual_seed(0), itc_gather_grad=True)["itc"].backward()
    assert results["paper"][0] == pytest.approx(results["lavis"][0], abs=1e-7)
    paper, lavis = results["paper"][1], results["lavis"][1]
    cosine = float(F.cosine_similarity(paper, lavis, dim=0))
    ratio = float(paper.norm() / lavis.norm())
    assert cosine < 0.99 and abs(ratio - 1) > 0.01, (cosine, ratio)
    reference = flat(grads(full))  # paper: the loss's full gradient
    assert float((paper - reference).norm() / reference.norm()) < GRAD_TOL
    print(f"\nITC gradient paper vs lavis: cosine {cosine:.4f}, norm ratio {ratio:.3f}")


# -- the other rows -------------------------------------------------------------------------------

def test_recipes_set_every_row_and_a_row_given_explicitly_wins():
    paper = Stage1Config(root="r", run="x", vision="v", out="o")
    lavis = Stage1Config(root="r", run="x", vision="v", out="o", recipe="lavis")
    assert (paper.itc_gather_grad, paper.grad_clip, paper.betas, paper.warmup_steps, paper.warmup_lr,
            paper.lr_schedule, paper.min_lr, paper.text_processing) == (
        "local", 1.0, (0.9, 0.98), 2000, 0.0, "cosine-step", 1e-5, "tokenizer")
    assert (lavis.itc_gather_grad, lavis.grad_clip, lavis.betas, lavis.warmup_steps, lavis.warmup_lr,
            lavis.lr_schedule, lavis.min_lr, lavis.text_processing) == (
        "none", 0.0, (0.9, 0.999), 5000, 1e-6, "cosine-epoch", 1e-5, "pre_caption")
    mixed = Stage1Config(root="r", run="x", vision="v", out="o", recipe="lavis", grad_clip=1.0, betas=(0.9, 0.98))
    assert (mixed.grad_clip, mixed.betas, mixed.itc_gather_grad) == (1.0, (0.9, 0.98), "none")
    assert (STAGE2["paper"].min_lr, STAGE2["lavis"].min_lr) == (5e-5, 1e-5)
    assert (STAGE2["lavis"].llm_train_mode, STAGE2["lavis"].caption_end, STAGE2["lavis"].warmup_steps) == (True, "newline", 2000)
    from capfilt.errors import ConfigError

    with pytest.raises(ConfigError, match="--recipe"):
        Stage1Config(root="r", run="x", vision="v", out="o", recipe="blip")
    with pytest.raises(ConfigError, match="--lr-schedule"):
        Stage1Config(root="r", run="x", vision="v", out="o", lr_schedule="linear")


def test_lavis_schedule_warms_up_in_epoch_zero_then_steps_a_cosine_per_epoch():
    cfg = Stage1Config(root="r", run="x", vision="v", out="o", recipe="lavis", steps=40, warmup_steps=5)
    lr = lambda step: cfg.lr * lr_factor(step, cfg, epoch=step // 10, epochs=4)  
    assert lr(0) == pytest.approx(1e-6)
    assert lr(2) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 2 / 5)
    assert lr(5) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-4)  # held at the peak for the rest of epoch 0
    for epoch in (1, 2, 3):
        expected = 1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * epoch / 4))
        assert lr(10 * epoch) == pytest.approx(expected) and lr(10 * epoch + 9) == pytest.approx(expected)


def test_pre_caption_is_lavis_text_processing():
    assert pre_caption("A Dog (brown) runs!!  On the  GRASS.\n") == "a dog brown runs on the grass"
    assert pre_caption("x, y: z~") == "x, y z"
    assert pre_caption(" ".join(f"w{i}" for i in range(60))).split() == [f"w{i}" for i in range(50)]


def test_a_lavis_recipe_run_records_its_rows_and_follows_the_lavis_schedule(tmp_path):
    make_curated_run(tmp_path / "data", "r1", images=16, seed=0)
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                num_query_tokens=4, embed_dim=16, max_position_embeddings=64)
    cfg = Stage1Config(root=str(tmp_path / "data"), run="r1", vision=make_clip_vision(tmp_path / "clip"),
                       out=str(tmp_path / "out"), tokenizer=str(make_tokenizer(tmp_path / "tok")), bert=None,
                       model=tiny, steps=6, batch_size=8, warmup_steps=1, lr=1e-3, min_lr=1e-4, log_every=1,
                       checkpoint_every=6, progress=False, device="cpu", recipe="lavis", augment=False)
    result = train(cfg)
    info = json.loads((tmp_path / "out" / "step-00000006" / "stage1.json").read_text())["config"]
    assert info["recipe"] == "lavis"
    assert (info["itc_gather_grad"], info["grad_clip"], info["betas"], info["lr_schedule"], info["warmup_lr"],
            info["text_processing"]) == ("none", 0.0, [0.9, 0.999], "cosine-epoch", 1e-6, "pre_caption")
    # 16 images, batch 8: two steps an epoch, three epochs; the LR logged after step s is the one step s+1 runs with
    logged = [r["lr"] for r in result["metrics"]]
    expected = [cfg.lr * lr_factor(s, cfg, epoch=s // 2, epochs=3) for s in range(1, 7)]
    assert logged == pytest.approx(expected)
    assert logged[0] == pytest.approx(1e-3) and logged[1] < logged[0]


# -- official BLIP-2 checkpoints keep their end of caption ----------------------------------------

def official_blip2(folder, llm: str):
    """A tiny randomly initialised Blip2ForConditionalGeneration saved with save_pretrained, laid
    out as transformers' conversions of Salesforce's checkpoints are: OPT's text eos is "\\n"
    (the tokenizer's stays `</s>`), T5's is `</s>`. The OPT's final LayerNorm bias and the "\\n"
    embedding point the same way, so "\\n" wins often and generation really stops there."""
    from stage2_world import make_t5
    from transformers import (
        AddedToken,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        T5Config,
    )

    from model.captioners import save_random_captioner

    if llm == "opt":
        source = save_random_captioner(str(folder / "src"), "blip-2", image_size=32)
        hf = Blip2ForConditionalGeneration.from_pretrained(source)
        processor = Blip2Processor.from_pretrained(source)
        tokenizer = processor.tokenizer
        newline = tokenizer("\n", add_special_tokens=False).input_ids
        assert len(newline) == 1 and newline[0] != tokenizer.eos_token_id
        hf.config.text_config.eos_token_id = newline[0]
        hf.language_model.generation_config.eos_token_id = newline[0]
        hf.generation_config.eos_token_id = newline[0]
        torch.manual_seed(1)
        direction = F.normalize(torch.randn(hf.config.text_config.hidden_size), dim=0)
        with torch.no_grad():
            hf.language_model.model.decoder.final_layer_norm.bias.copy_(1.5 * direction)
            hf.language_model.get_input_embeddings().weight[newline[0]] = 2.0 * direction
    else:
        t5 = make_t5(folder / "t5", pretrain_steps=0)
        tokenizer = AutoTokenizer.from_pretrained(t5)
        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        tokenizer.image_token = "<image>"
        text = T5Config.from_pretrained(t5)
        width = 32
        config = Blip2Config(
            vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8),
            qformer_config=dict(vocab_size=64, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=2 * width, encoder_hidden_size=width, cross_attention_frequency=1,
                                max_position_embeddings=64),
            text_config=text.to_dict(), num_query_tokens=4,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        torch.manual_seed(0)
        hf = Blip2ForConditionalGeneration(config)
        processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    out = folder / "blip2"
    hf.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    made = {}

    def get(llm):
        if llm not in made:
            made[llm] = official_blip2(tmp_path_factory.mktemp(llm), llm)
        return made[llm]
    return get


def pictures(n=3) -> list[bytes]:
    import io

    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    pics = []
    for _ in range(n):
        pixels = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        pics.append(buffer.getvalue())
    return pics


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_an_official_blip2_checkpoint_stops_where_transformers_stops(official, llm):
    import io

    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from model.stage2 import Stage2Generator

    folder = official(llm)
    ours = Stage2Generator.from_checkpoint(str(folder), device="cpu")
    hf = Blip2ForConditionalGeneration.from_pretrained(str(folder)).eval()
    processor = Blip2Processor.from_pretrained(str(folder))
    assert ours.model.config.caption_end == ("newline" if llm == "opt" else "eos")
    eos = hf.language_model.generation_config.eos_token_id
    assert ours.model.layout.eos == eos
    pics = pictures()
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in pics]
    pad = ours.model.layout.pad
    stopped = 0
    for prompt in ("", "a photo of"):
        for beams in (1, 3):
            mine = ours.generate_ids(pics, [prompt] * 3, num_beams=beams, max_new_tokens=10, min_new_tokens=2)
            inputs = processor(images=pil, text=[prompt] * 3, return_tensors="pt")
            with torch.no_grad():
                theirs = hf.generate(**inputs, num_beams=beams, max_new_tokens=10, min_new_tokens=2)
            theirs = theirs[:, inputs["input_ids"].shape[1]:] if llm == "opt" else theirs[:, 1:]
            rows = []
            for row in theirs.tolist():
                stopped += eos in row
                rows.append([t for t in (row[: row.index(eos)] if eos in row else row) if t != pad])
            assert mine == rows, (prompt, beams)
    if llm == "opt":
        assert stopped > 0  # generation really ended at "\n" somewhere, so the test tells the conventions apart


# -- LAVIS's generation and retrieval defaults as presets -------------------------------------------

@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_generate_presets_are_lavis_decoding_and_explicit_options_win(official, llm, tmp_path, capsys):
    from capfilt.cli import main as cli_main
    from model.stage2 import Stage2Generator

    folder = official(llm)
    path = tmp_path / "img.png"
    path.write_bytes(pictures(1)[0])
    ours = Stage2Generator.from_checkpoint(str(folder), device="cpu")

    def run(*args) -> str:
        cli_main(["generate", "--stage2", str(folder), str(path), "--device", "cpu", *args])
        # "path\tcaption\n": a random tiny model may answer with nothing, so keep the tab (no strip())
        return capsys.readouterr().out.rstrip("\n").split("\t", 1)[1]

    vqa = ours.answer(pictures(1), ["what is it?"], num_beams=5, max_new_tokens=10, template="Question: {} Short answer:",
                      length_penalty=-1.0 if llm == "t5" else 0.0)
    assert run("--preset", "lavis-vqa", "--question", "what is it?") == vqa[0]
    caption = ours.caption(pictures(1), num_beams=5, max_new_tokens=30, min_new_tokens=8)
    assert run("--preset", "lavis-caption") == caption[0]
    assert len(ours.generate_ids(pictures(1), [""], num_beams=5, max_new_tokens=30, min_new_tokens=8)[0]) >= 8
    short = ours.caption(pictures(1), num_beams=2, max_new_tokens=3, min_new_tokens=1)
    assert run("--preset", "lavis-caption", "--num-beams", "2", "--max-new-tokens", "3", "--min-new-tokens", "1") == short[0]


def test_eval_preset_lavis_and_the_rerank_score():
    from model.recipes import EVAL_PRESETS, preset_values
    from pipeline.metrics import rerank

    defaults = dict(rerank_k=16, rerank_score="itm+itc", num_beams=3, max_length=30, min_length=1)
    none = dict.fromkeys(defaults)
    assert preset_values(EVAL_PRESETS, "lavis", none, defaults) == dict(
        rerank_k=128, rerank_score="itm+itc", num_beams=5, max_length=30, min_length=8)
    assert preset_values(EVAL_PRESETS, "lavis", {**none, "rerank_k": 4}, defaults)["rerank_k"] == 4
    assert preset_values(EVAL_PRESETS, None, none, defaults) == defaults
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    itm = lambda q, cand: torch.tensor([0.0, 0.3, 0.0])[cand]
    assert rerank(sims, 3, itm, "itm+itc") == [[0, 1, 2]]  # 0.9 vs 0.8 vs 0.1
    assert rerank(sims, 3, itm, "itm") == [[1, 0, 2]]
    assert rerank(sims, 1, itm, "itm") == [[0, 1, 2]]  # only the ITC top k is re-ranked


# -- Stage 2 under the lavis recipe -----------------------------------------------------------------

def test_a_lavis_stage2_run_ends_captions_with_newline_keeps_llm_dropout_and_records_its_rows(tmp_path):
    from stage2_world import make_blip2_vision, make_opt, make_stage1_checkpoint

    from model.stage2 import Stage2Config, Stage2Generator, Stage2Objective, build_model, train

    make_curated_run(tmp_path / "data", "r1", images=16, seed=0)
    vision = make_blip2_vision(tmp_path / "vision")
    cfg = Stage2Config(root=str(tmp_path / "data"), run="r1", stage1=str(make_stage1_checkpoint(tmp_path / "s1", vision)),
                       llm=make_opt(tmp_path / "opt", pretrain_steps=0), out=str(tmp_path / "out"), steps=2,
                       batch_size=8, warmup_steps=1, lr=1e-3, augment=False, log_every=1, checkpoint_every=2,
                       progress=False, device="cpu", recipe="lavis")
    model, _, _ = build_model(cfg, torch.device("cpu"))
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids
    assert model.layout.eos == newline[0] != model.tokenizer.eos_token_id
    example = model.layout.example("", "A red circle.")
    assert example["labels"][-1] == newline[0] and model.tokenizer.eos_token_id not in example["labels"]
    objective = Stage2Objective(model)
    assert objective.train() and model.language_model.training  # LAVIS: the frozen LLM's dropout stays on
    assert objective.eval() and not model.language_model.training
    paper = Stage2Config(**{**cfg.__dict__, "recipe": "paper", "llm_train_mode": None, "caption_end": None,
                            "min_lr": None, "warmup_lr": None, "lr_schedule": None, "betas": None, "grad_clip": None,
                            "text_processing": None})
    paper_model = build_model(paper, torch.device("cpu"))[0]
    assert Stage2Objective(paper_model).train() and not paper_model.language_model.training

    result = train(cfg)
    info = json.loads((tmp_path / "out" / "step-00000002" / "stage2.json").read_text())["config"]
    assert (info["recipe"], info["min_lr"], info["llm_train_mode"], info["caption_end"], info["grad_clip"],
            info["betas"]) == ("lavis", 1e-5, True, "newline", 0.0, [0.9, 0.999])
    generator = Stage2Generator.from_checkpoint(result["checkpoint"], device="cpu")
    assert generator.model.config.caption_end == "newline" and generator.model.layout.eos == newline[0]


def test_cli_recipe_and_row_options_reach_the_trainers(monkeypatch):
    import model.stage2 as stage2
    import model.train_stage1 as stage1
    from capfilt.cli import main as cli_main

    seen = {}

    def capture(name):
        def fake_train(config):
            seen[name] = config
            return {"step": 0, "checkpoint": None, "metrics": []}
        return fake_train

    import pipeline.lineage as lineage

    monkeypatch.setattr(stage1, "train", capture("stage1"))
    monkeypatch.setattr(stage2, "train", capture("stage2"))
    monkeypatch.setattr(lineage, "curated_lineage", lambda root, run: None)  # no data: the config is the point
    monkeypatch.setattr(stage2, "stage1_info", lambda stage1: None)  # nor a Stage 1 checkpoint
    common = ["--root", "r", "--run", "x", "--out", "o", "--recipe", "lavis", "--beta2", "0.98"]
    cli_main(["train", "stage1", *common, "--vision", "v", "--itc-gather-grad", "local"])
    cli_main(["train", "stage2", *common, "--stage1", ".", "--llm", "l", "--llm-eval-mode", "--grad-clip", "2"])
    s1, s2 = seen["stage1"], seen["stage2"]
    assert (s1.recipe, s1.betas, s1.itc_gather_grad, s1.grad_clip, s1.warmup_steps, s1.text_processing) == (
        "lavis", (0.9, 0.98), "local", 0.0, 5000, "pre_caption")
    assert (s2.recipe, s2.betas, s2.llm_train_mode, s2.grad_clip, s2.caption_end, s2.min_lr, s2.warmup_steps) == (
        "lavis", (0.9, 0.98), False, 2.0, "newline", 1e-5, 2000)


# -- two workers: LAVIS's gather under torch.distributed ------------------------------------------

def _itc_worker(rank: int, port: int, out: str, local_grad: bool) -> None:
    import torch.distributed as dist

    from model.losses import itc_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images, texts, temp = _itc_leaves()
        mine = slice(3 * rank, 3 * rank + 3)
        image_local = images[mine].detach().clone().requires_grad_(True)
        text_local = texts[mine].detach().clone().requires_grad_(True)
        loss = itc_loss(F.normalize(image_local, dim=-1), F.normalize(text_local, dim=-1), temp, 0.1,
                        local_grad=local_grad).loss
        loss.backward()
        torch.save({"loss": loss.detach(), "image": image_local.grad, "text": text_local.grad, "temp": temp.grad},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _itc_leaves():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(6, 4, 8, generator=g).requires_grad_(True), torch.randn(6, 8, generator=g).requires_grad_(True),
            torch.tensor(0.1, requires_grad=True))


@pytest.mark.slow  # two spawned processes importing torch: about a minute on 2 busy cores
def test_two_workers_lavis_itc_gradient_is_the_lavis_reference(tmp_path):
    """Rank r's loss sees every rank's features but has a gradient only through its own (LAVIS
    under torch.distributed); the reference computes each rank's loss in one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_itc_worker, args=(port, str(tmp_path), False), nprocs=2, join=True)
    for rank in (0, 1):
        images, texts, temp = _itc_leaves()
        image_feats, text_feat = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        mine = slice(3 * rank, 3 * rank + 3)
        local_images, local_texts = image_feats[mine], text_feat[mine]
        sim_i2t = torch.einsum("bqd,nd->bnq", local_images, text_feat.detach()).max(-1).values / temp
        sim_t2i = torch.einsum("bd,nqd->bnq", local_texts, image_feats.detach()).max(-1).values / temp
        targets = torch.arange(3) + 3 * rank
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        loss.backward()
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(float(got["loss"]) - float(loss)) < LOSS_TOL
        for name, ref in (("image", images.grad[mine]), ("text", texts.grad[mine]), ("temp", temp.grad)):
            assert float((got[name] - ref).norm() / ref.norm()) < GRAD_TOL, (rank, name)
        assert images.grad[3 * (1 - rank):3 * (1 - rank) + 3].abs().sum() == 0  # nothing flows to the other rank
