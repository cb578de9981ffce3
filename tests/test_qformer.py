"""The Q-Former, its masks, its losses and its persistence, on tiny configs."""

from __future__ import annotations

import pytest
import torch

from model.losses import (
    Stage1Losses,
    gather_with_local_grad,
    itc_loss,
    itg_loss,
    sample_hard_negatives,
    stage1_losses,
)
from model.qformer import (
    QFormer,
    bidirectional_mask,
    config_for_tokenizer,
    init_from_bert,
    load_tokenizer,
    multimodal_causal_mask,
    unimodal_text_mask,
)
from stage1_world import make_bert, make_tokenizer

VISION_WIDTH = 48


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def tiny(tokenizer, **overrides):
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    num_query_tokens=8, embed_dim=32, vision_width=VISION_WIDTH, max_position_embeddings=64)
    settings.update(overrides)
    torch.manual_seed(0)
    return QFormer(config_for_tokenizer(tokenizer, **settings))


def batch(tokenizer, captions):
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


CAPTIONS = ["a small red circle on the left of a black background",
            "a large blue square at the top of a white background",
            "a small green cross in the middle of a gray background",
            "a large yellow diamond near the bottom of a black background"]


# -- masks --------------------------------------------------------------------------------------

def test_itg_mask_queries_never_see_text_and_text_is_causal():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    allowed = multimodal_causal_mask(2, text_mask)[0]
    assert allowed[:2, :2].all() and not allowed[:2, 2:].any()  # queries: queries only
    assert allowed[2:, :2].all()  # text sees every query
    text = allowed[2:, 2:]
    assert torch.equal(text[:3, :3], torch.tril(torch.ones(3, 3, dtype=torch.bool)))  # causal
    assert not text[:, 3].any()  # padding is never attended


def test_itc_text_mask_is_unimodal_and_itm_mask_is_bidirectional():
    text_mask = torch.tensor([[1, 1, 0]])
    assert unimodal_text_mask(text_mask)[0].tolist() == [[True, True, False]] * 3
    both = bidirectional_mask(2, text_mask)[0]
    assert both.shape == (5, 5) and both[:, :4].all() and not both[:, 4].any()


def test_masks_hold_inside_the_model(tokenizer):
    """Changing later text changes neither the queries nor earlier text positions under ITG."""
    model = tiny(tokenizer).eval()
    image = model.prepare_image(torch.randn(2, 5, VISION_WIDTH))
    ids, mask = batch(tokenizer, CAPTIONS[:2])
    changed = ids.clone()
    changed[:, 6] = tokenizer.convert_tokens_to_ids("purple")
    q = model.config.num_query_tokens

    def run(input_ids):
        allowed = multimodal_causal_mask(q, mask)
        embeds = model.embeddings(input_ids=input_ids, query_embeds=model.query_tokens.expand(2, -1, -1))
        return model._encode(embeds, allowed, q, image)

    with torch.no_grad():
        a, b = run(ids), run(changed)
    assert torch.allclose(a[:, :q], b[:, :q], atol=1e-6)  # queries never see text
    assert torch.allclose(a[:, q:q + 6], b[:, q:q + 6], atol=1e-6)  # text before position 6 unchanged
    assert not torch.allclose(a[:, q + 6], b[:, q + 6])  # the changed token itself does change
    # ITC's text side sees no image: its features do not depend on the image at all.
    with torch.no_grad():
        t1 = model.text_features(ids, mask)
    assert t1.shape == (2, model.config.embed_dim)


# -- losses -------------------------------------------------------------------------------------

def test_hard_negatives_never_sample_a_positive():
    generator = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 2, 2, 3])
    positive = image_ids[:, None] == image_ids[None, :]
    sim = torch.zeros(6, 6)
    sim[positive] = 50.0  # positives are by far the most similar: the tempting wrong choice
    for _ in range(200):
        picked = sample_hard_negatives(sim, positive, generator)
        assert not positive[torch.arange(6), picked].any()


def test_hard_negatives_prefer_similar_ones():
    generator = torch.Generator().manual_seed(0)
    positive = torch.eye(3, dtype=torch.bool)
    sim = torch.tensor([[0.0, 10.0, -10.0], [10.0, 0.0, -10.0], [10.0, -10.0, 0.0]])
    picks = torch.stack([sample_hard_negatives(sim, positive, generator) for _ in range(100)])
    assert (picks[:, 0] == 1).float().mean() > 0.95


def test_a_batch_of_one_image_has_no_negative_and_says_so():
    from capfilt.errors import ConfigError

    with pytest.raises(ConfigError, match="no negative"):
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_itc_takes_the_best_query():
    image = torch.zeros(2, 3, 2)
    image[0, 2] = torch.tensor([1.0, 0.0])  # image 0's third query matches text 0
    image[1, 0] = torch.tensor([0.0, 1.0])
    text = torch.eye(2)
    out = itc_loss(image, text, torch.tensor(0.1), label_smoothing=0.0)
    assert torch.allclose(out.sim_i2t, torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    assert out.loss < 1e-3


def test_single_worker_gather_keeps_the_gradient():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_local_grad(x) is x


def test_each_loss_decreases_on_synthetic_features(tokenizer):
    model = tiny(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    features = torch.randn(8, 5, VISION_WIDTH)  # 8 distinct "images"
    captions = [CAPTIONS[i % 4].replace("a ", f"a {['small', 'large'][i // 4]} ", 1) for i in range(8)]
    ids, mask = batch(tokenizer, captions)
    image_ids = torch.arange(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        out = stage1_losses(model, features, ids, mask, image_ids, generator=generator)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        history.append([out.itc.item(), out.itm.item(), out.itg.item()])
    first, last = torch.tensor(history[0]), torch.tensor(history[-5:]).mean(0)
    itc, itm, itg = last / first
    assert itc < 0.8 and itg < 0.8, (first, last)
    # ITM first learns the 1:2 label prior (loss 0.64 from ~0.70) and only then, once ITC has
    # made its hard negatives meaningful, the matching itself (~100 steps here); the
    # end-to-end trainer test checks that part on real images.
    assert itm < 0.97, (first, last)


def separate_passes(model, features, ids, mask, image_ids, generator):
    """Stage 1 as it was computed before passes shared work: a query-only pass for ITC's image
    side, ITM over 3B image copies, ITG's own [queries ; text] pass recomputing the queries."""
    model.clamp_temperature()
    image_tokens = model.prepare_image(features)
    image_feats = torch.nn.functional.normalize(model.vision_projection(model.query_output(image_tokens)), dim=-1)
    itc = itc_loss(image_feats, model.text_features(ids, mask), model.temp)
    positive = image_ids[:, None] == image_ids[None, :]
    neg_image = sample_hard_negatives(itc.sim_t2i, positive, generator, hard=False)
    neg_text = sample_hard_negatives(itc.sim_i2t, positive, generator, hard=False)
    pair_images = torch.cat([image_tokens, image_tokens, model.prepare_image(features[neg_image])])
    logits = model.itm_logits(pair_images, torch.cat([ids, ids[neg_text], ids]), torch.cat([mask, mask[neg_text], mask]))
    labels = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(2 * len(ids), dtype=torch.long)])
    itm = torch.nn.functional.cross_entropy(logits, labels)
    itg = itg_loss(model, image_tokens, ids, mask)
    return Stage1Losses(itc.loss + itm + itg, itc.loss, itm, itg, torch.tensor(0.0))


def test_shared_query_pass_and_itm_images_give_the_same_losses_and_gradients(tokenizer):
    """ITG reading the query pass's keys and values, and ITM projecting each image's
    cross-attention once, change the work done, not the losses or the gradients."""
    model = tiny(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cross_attention_frequency=1)
    torch.manual_seed(2)
    features = torch.randn(4, 5, VISION_WIDTH)
    ids, mask = batch(tokenizer, CAPTIONS)
    image_ids = torch.arange(4)

    def run(fn):
        model.zero_grad()
        out = fn(model, features, ids, mask, image_ids, torch.Generator().manual_seed(0))
        out.total.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    old, old_grads = run(separate_passes)
    new, new_grads = run(lambda *args: stage1_losses(*args[:5], generator=args[5], hard_negatives=False))
    for name in ("itc", "itm", "itg", "total"):
        assert torch.allclose(getattr(old, name), getattr(new, name), atol=1e-6), name
    assert old_grads.keys() == new_grads.keys() and "query_tokens" in new_grads
    for name, grad in old_grads.items():
        assert torch.allclose(grad, new_grads[name], atol=1e-6, rtol=1e-4), name


def test_padding_to_the_longest_text_gives_the_losses_and_gradients_of_padding_to_max_length(tokenizer):
    """The trainer pads a batch's texts to its longest (model/data.py): padding is masked out of
    every attention and loss, so cutting it changes the cost, not the losses or the gradients."""
    model = tiny(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cross_attention_frequency=1)
    torch.manual_seed(2)
    features = torch.randn(4, 5, VISION_WIDTH)
    padded = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    trimmed = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    assert trimmed.input_ids.shape[1] < padded.input_ids.shape[1] == 32

    def run(ids, mask):
        model.zero_grad()
        out = stage1_losses(model, features, ids, mask, torch.arange(4), generator=torch.Generator().manual_seed(0))
        out.total.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(padded.input_ids, padded.attention_mask)
    short, short_grads = run(trimmed.input_ids, trimmed.attention_mask)
    for name in ("itc", "itm", "itg", "total"):
        assert torch.allclose(getattr(full, name), getattr(short, name), atol=1e-6), name
    for name, grad in full_grads.items():
        assert torch.allclose(grad, short_grads[name], atol=1e-6, rtol=1e-4), name


# -- persistence --------------------------------------------------------------------------------

def test_save_and_load_round_trip(tokenizer, tmp_path):
    model = tiny(tokenizer).eval()
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = QFormer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.lm_head.decoder.weight is loaded.embeddings.word_embeddings.weight  # still tied
    assert load_tokenizer(tmp_path / "ckpt").convert_tokens_to_ids("[DEC]") == model.config.dec_token_id


def test_loading_a_folder_without_config_names_the_folder(tmp_path):
    from capfilt.errors import ConfigError

    with pytest.raises(ConfigError, match=str(tmp_path)):
        QFormer.from_pretrained(tmp_path)


def test_init_from_bert_copies_every_bert_weight(tokenizer, tmp_path):
    from transformers import BertForMaskedLM

    bert_dir = make_bert(tmp_path / "bert", make_tokenizer(tmp_path / "tok"))
    model = tiny(tokenizer)
    missing = init_from_bert(model, bert_dir)
    bert = BertForMaskedLM.from_pretrained(str(bert_dir)).state_dict()
    state = model.state_dict()
    layer = "qformer.encoder.layer.0"
    assert torch.equal(state[f"{layer}.attention.attention.query.weight"], bert["bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(state[f"{layer}.intermediate_query.dense.weight"], bert["bert.encoder.layer.0.intermediate.dense.weight"])
    assert torch.equal(state[f"{layer}.output_query.LayerNorm.weight"], bert["bert.encoder.layer.0.output.LayerNorm.weight"])
    assert torch.equal(state["qformer.layernorm.weight"], bert["bert.embeddings.LayerNorm.weight"])
    vocab = bert["bert.embeddings.word_embeddings.weight"].shape[0]
    assert torch.equal(state["embeddings.word_embeddings.weight"][:vocab], bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(state["lm_head.dense.weight"], bert["cls.predictions.transform.dense.weight"])
    # What BERT cannot provide: cross-attention, queries, heads, ln_vision, temperature.
    assert all(k.startswith(("qformer.encoder.layer.0.crossattention", "query_tokens", "vision_projection",
                             "text_projection", "itm_head", "ln_vision", "temp")) for k in missing), missing


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    ids, mask = batch(tokenizer, CAPTIONS)
    features = torch.randn(4, 5, VISION_WIDTH)
    grads = []
    for checkpointing in (False, True):
        model = tiny(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        out = stage1_losses(model, features, ids, mask, torch.arange(4), generator=torch.Generator().manual_seed(0))
        out.total.backward()
        grads.append(model.qformer.encoder.layer[0].attention.attention.query.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
