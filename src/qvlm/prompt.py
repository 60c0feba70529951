"""Stage-2 prompts: the LLM's own chat template, Q image slots, and an exact assistant-only label mask.

BLIP-2 (§3.3) prefixes the LLM input with the projected query outputs; the article instead places
them inside a chat: a system turn, a user turn holding the image, then the assistant's caption or
answer, with the system and user prompts drawn from configurable lists. This module turns text
into token ids (models never tokenise):

* The conversation is rendered to a *string* with ``tokenizer.apply_chat_template``, split at the
  image placeholder, and the parts are tokenised separately (``add_special_tokens=False``) around
  ``num_queries`` slot ids (the pad id; ``VLM.merge`` overwrites those embeddings).
* The target starts where the generation prompt (``add_generation_prompt=True``) ends; that string
  must be a prefix of the full conversation. Prompt and completion are tokenised separately, so
  the first supervised index is exactly the length of the generation prompt.
* Labels cover the target tokens and the end-of-turn token(s) the template writes after it
  (``<|im_end|>`` for SmolLM2). Whitespace the template writes *after* the end-of-turn token
  (SmolLM2's "\\n") is dropped from the example: it is formatting between turns, predicts nothing
  and is never generated (generation stops at the end-of-turn token).
* Anything a template writes between the generation prompt and the target (e.g. an empty
  ``<think></think>`` block) is input, not supervised. A template that changes the target text
  (upper-cases it, drops it) leaves the whole completion supervised, and ``check_labels`` fails.
* ``image_position="prefix"``: the image slots come first, before everything the template writes
  (BLIP-2's layout, as transformers' ``Blip2Processor`` and vLLM build it); the user turn holds
  the text only.
* Truncation (``max_len``) shortens only the target, keeping the end-of-turn token; an example
  left with no target tokens (empty, or truncated away) supervises nothing, since teaching an
  immediate end-of-turn would teach empty answers. ``check_batch`` fails a batch of only those.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IGNORE = -100  # the label of every position that is not supervised (HF / torch cross-entropy)


class PromptError(ValueError):
    """The chat template, the prompt lengths or the label mask make a sample unusable."""


@dataclass
class Example:
    """One tokenised stage-2 sample; the three lists have the same length T."""

    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) IGNORE except the target tokens + end-of-turn token(s)
    image_mask: list[bool]  # (T,) exactly Q True: the image slots (none in a text-only sample)
    target: str | None  # None: a generation prompt
    truncated: bool = False  # the target was cut to fit max_len


@dataclass
class Turn:
    """What one record asks and answers: the system prompt (or None), the user text and the target."""

    system: str | None
    user: str
    target: str
    source: str = "caption"  # "caption" or "qa"


# --------------------------------------------------------------------------------------------
# Rendering and tokenising
# --------------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError(f"tokenizer {type(tokenizer).__name__} has no chat template; stage 2 needs a chat LLM "
                          "(an *-Instruct / chat model) or a tokenizer with chat_template set")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(tokenizer, system: str | None, content: str, target: str | None) -> tuple[str, str]:
    """(generation prompt, completion) strings; prompt + completion is the full conversation.

    A template that rejects a system turn (raises) gets the system text at the top of the user turn."""
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": content}]
    if system:
        try:
            apply_template(tokenizer, [{"role": "system", "content": system}, *messages], True)
            messages.insert(0, {"role": "system", "content": system})
        except TemplateError:
            messages = [{"role": "user", "content": f"{system}\n\n{content}"}]
    prompt = apply_template(tokenizer, messages, add_generation_prompt=True)
    if target is None:
        return prompt, ""
    full = apply_template(tokenizer, [*messages, {"role": "assistant", "content": target}])
    if not full.startswith(prompt):
        raise PromptError(
            "the chat template's generation prompt is not a prefix of the conversation with the answer, so "
            f"the target cannot be located.\n generation prompt: {prompt!r}\n conversation:      {full!r}")
    return prompt, full[len(prompt):]


def image_prompt_ids(tokenizer, prompt: str, num_queries: int, placeholder: str) -> tuple[list[int], list[bool]]:
    """Tokenise ``prompt`` with its one ``placeholder`` replaced by ``num_queries`` slot ids."""
    parts = prompt.split(placeholder)
    if len(parts) != 2:
        raise PromptError(f"the rendered prompt must hold the image placeholder {placeholder!r} exactly once, "
                          f"found {len(parts) - 1}: {prompt!r}")
    before, after = encode(tokenizer, parts[0]), encode(tokenizer, parts[1])
    ids = before + [slot_id(tokenizer)] * num_queries + after  # (P,) with P = len(before) + Q + len(after)
    mask = [False] * len(before) + [True] * num_queries + [False] * len(after)
    return ids, mask


def slot_id(tokenizer) -> int:
    """The id written at image slots (their embeddings are replaced): pad, else eos, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def split_completion(completion: str, target: str) -> tuple[str, str, str]:
    """(scaffold, target, end of turn) in the completion, trailing whitespace dropped.

    If the template does not render the target verbatim (or stripped), the whole completion is
    returned as the "target": it is then supervised and ``check_labels`` reports the mismatch."""
    if not target.strip():
        return "", "", ""  # nothing to supervise: the example ends with the prompt
    kept = completion.rstrip()
    for text in (target, target.strip()):
        i = kept.find(text)
        if i >= 0:
            return kept[:i], text, kept[i + len(text):]
    return "", kept, ""


# --------------------------------------------------------------------------------------------
# Examples and the mismatch guard
# --------------------------------------------------------------------------------------------


def build_example(tokenizer, num_queries: int, user: str, target: str | None, system: str | None = None,
                  placeholder: str = "<image>", max_len: int | None = None,
                  image_position: str = "user_turn") -> Example:
    """One sample: [system] user(image slots + text) [assistant target + end of turn]; with
    ``image_position="prefix"``: image slots, then [system] user(text) [assistant ...].

    ``target=None`` gives a generation prompt (ending with the assistant header, nothing supervised).
    ``num_queries=0`` gives a text-only sample: the user text as it is, no image slots (text replay).
    ``max_len`` bounds T by truncating the target only; a prompt longer than it is a ``PromptError``."""
    if num_queries < 0:
        raise PromptError(f"num_queries must be >= 0, got {num_queries}")
    prefix = image_position == "prefix" and num_queries > 0
    if prefix:
        content = user.replace(placeholder, "").strip()
    else:
        content = user if placeholder in user or not num_queries else f"{placeholder}\n{user}"
    prompt, completion = render(tokenizer, system, content, target)
    if prefix:
        ids = [slot_id(tokenizer)] * num_queries + encode(tokenizer, prompt)  # (P,) = (Q + template,)
        mask = [True] * num_queries + [False] * (len(ids) - num_queries)
    elif num_queries:
        ids, mask = image_prompt_ids(tokenizer, prompt, num_queries, placeholder)  # (P,)
    else:
        ids = encode(tokenizer, prompt)
        mask = [False] * len(ids)
    scaffold, body, eot = ([], [], []) if target is None else [
        encode(tokenizer, s) for s in split_completion(completion, target)]
    fixed = len(ids) + len(scaffold)
    if max_len is not None and fixed > max_len:
        raise PromptError(f"the prompt alone is {fixed} tokens ({num_queries} image slots) but max_len is "
                          f"{max_len}: raise max_len, shorten the system/user prompts or use fewer queries")
    keep = len(body) if max_len is None else max(0, min(len(body), max_len - fixed - len(eot)))
    supervised = body[:keep] + eot if keep else []  # nothing to learn without target tokens
    return Example(
        input_ids=ids + scaffold + supervised,  # (T,) = (P + scaffold + kept target + end of turn,)
        labels=[IGNORE] * fixed + supervised,
        image_mask=mask + [False] * (len(scaffold) + len(supervised)),
        target=target,
        truncated=keep < len(body),
    )


def check_labels(tokenizer, example: Example) -> None:
    """Raise ``PromptError`` unless the supervised tokens decode to the target (a prefix if truncated)."""
    positions = [i for i, label in enumerate(example.labels) if label != IGNORE]
    if any(example.labels[i] != example.input_ids[i] or example.image_mask[i] for i in positions):
        raise PromptError("labels must copy input_ids at supervised positions and never cover image slots")
    if example.target is None:
        if positions:
            raise PromptError(f"a generation prompt has {len(positions)} supervised tokens")
        return
    got = tokenizer.decode([example.labels[i] for i in positions], skip_special_tokens=True).strip()
    want = example.target.strip()
    if got == want or (example.truncated and want.startswith(got.rstrip("\ufffd").rstrip())):
        return
    raise PromptError(
        "the label tokens do not decode to the target: the chat template and the label mask disagree "
        f"(does the template change or drop the assistant's text?)\n labels decode to: {got!r}\n target:           "
        f"{want!r}")


def check_batch(labels) -> None:
    """Raise ``PromptError`` if a (B, T) label tensor supervises nothing (the loss would be NaN or 0)."""
    if labels.numel() == 0 or not bool((labels != IGNORE).any()):
        raise PromptError(
            f"batch has no supervised tokens ({labels.shape[0]} samples): every target is empty or was truncated "
            "away by max_len; raise max_len, shorten the prompts or use fewer queries")


# --------------------------------------------------------------------------------------------
# Choosing what a record asks
# --------------------------------------------------------------------------------------------


def pick_prompts(cfg_llm, rng: random.Random) -> tuple[str | None, str]:
    """(system prompt or None when the list is empty, user prompt), drawn from the config's lists."""
    system = rng.choice(cfg_llm.system_prompts) if cfg_llm.system_prompts else None
    if not cfg_llm.user_prompts:
        raise PromptError("model.llm.user_prompts is empty: give at least one user prompt")
    return system, rng.choice(cfg_llm.user_prompts)


def qa_pairs(messages: list[dict] | None) -> list[tuple[str, str]]:
    """(question, answer) for every user turn directly followed by an assistant turn."""
    messages = messages or []
    return [(q["content"], a["content"]) for q, a in zip(messages, messages[1:])
            if q["role"] == "user" and a["role"] == "assistant"]


def pick_turn(record: dict, cfg_llm, rng: random.Random, caption_prob: float = 0.5) -> Turn:
    """What to train on for one record, drawn from ``rng`` only.

    A record with question-answer ``messages`` trains on one pair; if it also has its own caption
    (not just a copy of an answer), the caption task is chosen with probability ``caption_prob``.
    A caption-only record pairs its caption with a random user prompt. A system turn in the record's
    messages replaces the configured system prompt."""
    system, user = pick_prompts(cfg_llm, rng)
    messages = record.get("messages") or []
    system = next((t["content"] for t in messages if t["role"] == "system"), system)
    pairs = qa_pairs(messages)
    caption = record.get("caption") or ""
    own_caption = bool(caption) and caption not in {a for _, a in pairs}
    if not pairs or (own_caption and rng.random() < caption_prob):
        return Turn(system, user, caption, "caption")
    question, answer = pairs[rng.randrange(len(pairs))]
    return Turn(system, question, answer, "qa")


def decoder_start_id(tokenizer) -> int:
    """BLIP-2 adds a [DEC] token; a BERT vocabulary has spare ``[unused0]`` for the same role."""
    for token in ("[DEC]", "[unused0]"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            return tid
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.cls_token_id:
        return tokenizer.bos_token_id
    raise ValueError("the Q-Former tokenizer has no [DEC], [unused0] or distinct BOS token for ITG")


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokenizer's eos plus the end-of-turn tokens common chat templates use, when present."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return sorted(ids)
