"""Stage-2 prompts: the LLM's own chat template, Q image slots, and an exact assistant-only label mask.

BLIP-2 (§3.3) prefixes the LLM input with the projected query outputs; the article instead places
them inside a chat: a system turn, a user turn holding the image, then the assistant's caption or
answer, with the system and user prompts drawn from configurable lists. This module turns text
into token ids (models never tokenise):

* The conversation is rendered to a *string* with ``tokenizer.apply_chat_template``, split at the
  image placeholder, and the parts are tokenised separately (``add_special_tokens=False``) around
  ``num_queries`` slot ids (the pad id; ``VLM.merge`` overwrites those embeddings).
* A conversation trains whole (``build_chat``): each assistant turn's target starts where the
  generation prompt before it ends, which must be a prefix of the conversation with that turn.
  Prompts and completions are tokenised separately, so each supervised span starts exactly where
  its generation prompt ends.
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
* Truncation (``max_len``) drops whole trailing exchanges (counted in ``dropped_turns``); a first
  exchange still too long keeps its prompt and shortens its target, keeping the end-of-turn token.
  An example left with no target tokens (empty, or truncated away) supervises nothing, since
  teaching an immediate end-of-turn would teach empty answers. ``check_batch`` fails a batch of
  only those.
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
    labels: list[int]  # (T,) IGNORE except every kept assistant turn's tokens + end-of-turn token(s)
    image_mask: list[bool]  # (T,) exactly Q True: the image slots (none in a text-only sample)
    targets: tuple[str, ...] = ()  # the kept assistant turns; () for a generation prompt
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) of each target's supervised tokens
    truncated: bool = False  # the (only kept) target was cut to fit max_len
    dropped_turns: int = 0  # trailing assistant turns left out to fit max_len

    @property
    def target(self) -> str | None:
        return self.targets[0] if self.targets else None


@dataclass
class Conversation:
    """What one record trains on: messages ({"role", "content"}: system, user, assistant, ...)."""

    messages: list[dict]
    source: str = "caption"  # "caption" (a drawn prompt and the record's caption) or "chat"

    @property
    def user(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")

    @property
    def target(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "assistant"), "")


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


def with_system(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` as the template takes them: a template that rejects a system turn (raises) gets
    the system text at the top of the first user turn."""
    from jinja2 import TemplateError

    if not messages or messages[0]["role"] != "system":
        return messages
    try:
        apply_template(tokenizer, messages[:2], add_generation_prompt=True)
        return messages
    except TemplateError:
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        first = next((m for m in rest if m["role"] == "user"), None)
        if first is None:
            return rest
        first["content"] = f"{system}\n\n{first['content']}"
        return rest


def render_turns(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, ...]]:
    """The rendered conversation cut into exchanges: (input, scaffold, body, end of turn, target) per
    assistant turn, then (input, "", "", "", "") for a trailing generation prompt. The first four
    concatenated are the template's rendering (less the whitespace after the last end of turn); the
    body is the target as rendered (the whole completion when the template changes the target)."""
    parts, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = apply_template(tokenizer, messages[:i], add_generation_prompt=True)
        full = apply_template(tokenizer, messages[:i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise PromptError(
                "the chat template's generation prompt is not a prefix of the conversation with the answer, so "
                f"the target cannot be located.\n generation prompt: {prompt!r}\n conversation:      {full!r}")
        scaffold, body, eot = split_completion(full[len(prompt):], m["content"])
        parts.append((prompt[len(done):], scaffold, body, eot, m["content"]))
        done = prompt + scaffold + body + eot
    if add_generation_prompt:
        prompt = apply_template(tokenizer, messages, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise PromptError(f"the chat template renders earlier turns differently once more follow: {prompt!r}")
        parts.append((prompt[len(done):], "", "", "", ""))
    return parts


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
    """One exchange: [system] user(image slots + text) [assistant target + end of turn] (see
    ``build_chat``); ``target=None`` gives a generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if target is not None:
        messages.append({"role": "assistant", "content": target})
    return build_chat(tokenizer, num_queries, messages, placeholder, max_len, image_position)


def place_image(messages: list[dict], num_queries: int, placeholder: str, image_position: str) -> list[dict]:
    """The messages with the image placeholder where the slots go: in the user turn that has it (else
    at the start of the first user turn); none with ``prefix`` or without an image."""
    marked = [i for i, m in enumerate(messages) if placeholder in m["content"]]
    if len(marked) > 1 or any(messages[i]["content"].count(placeholder) > 1 for i in marked):
        raise PromptError(f"the conversation holds the image placeholder {placeholder!r} more than once")
    if marked and messages[marked[0]]["role"] != "user":
        raise PromptError(f"the image placeholder {placeholder!r} is in a {messages[marked[0]]['role']} turn")
    out = [dict(m) for m in messages]
    if not num_queries or image_position == "prefix":
        for m in out:
            m["content"] = m["content"].replace(placeholder, "").strip()
    elif not marked:
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise PromptError("the conversation has no user turn to hold the image")
        first["content"] = f"{placeholder}\n{first['content']}"
    return out


def build_chat(tokenizer, num_queries: int, messages: list[dict], placeholder: str = "<image>",
               max_len: int | None = None, image_position: str = "user_turn") -> Example:
    """A whole conversation as one sample: every assistant turn supervised (its tokens and end of
    turn), system and user turns not, the image slots in their place; ending with a user turn it is
    a generation prompt. ``num_queries=0``: a text-only sample. ``max_len`` bounds T: trailing
    exchanges are dropped whole; a first exchange still too long keeps its prompt and a cut target,
    and a prompt alone longer than ``max_len`` is a ``PromptError``."""
    if num_queries < 0:
        raise PromptError(f"num_queries must be >= 0, got {num_queries}")
    if not any(m["role"] == "user" for m in messages):
        raise PromptError("the conversation has no user turn")
    prefix = num_queries > 0 and image_position == "prefix"
    messages = with_system(tokenizer, place_image(messages, num_queries, placeholder, image_position))
    parts = render_turns(tokenizer, messages, add_generation_prompt=messages[-1]["role"] != "assistant")
    ex = Example(input_ids=[slot_id(tokenizer)] * num_queries if prefix else [], labels=[], image_mask=[])
    ex.image_mask, ex.labels = [True] * len(ex.input_ids), [IGNORE] * len(ex.input_ids)
    for n, (prompt, scaffold, body, eot, target) in enumerate(parts):
        if num_queries and not prefix and placeholder in prompt:
            p_ids, p_mask = image_prompt_ids(tokenizer, prompt, num_queries, placeholder)
        else:
            p_ids = encode(tokenizer, prompt)
            p_mask = [False] * len(p_ids)
        fixed = p_ids + encode(tokenizer, scaffold)
        b_ids, e_ids = encode(tokenizer, body), encode(tokenizer, eot)
        room = None if max_len is None else max_len - len(ex.input_ids) - len(fixed)
        if room is not None and n and room < len(b_ids) + len(e_ids):
            ex.dropped_turns = sum(1 for x in parts[n:] if x[2] or x[3])  # dropped whole, never half a turn
            break
        if room is not None and room < 0:
            raise PromptError(f"the prompt alone is {max_len - room} tokens ({num_queries} image slots) but max_len "
                              f"is {max_len}: raise max_len, shorten the system/user prompts or use fewer queries")
        keep = len(b_ids) if room is None else max(0, min(len(b_ids), room - len(e_ids)))
        supervised = b_ids[:keep] + e_ids if keep else []  # nothing to learn without target tokens
        ex.image_mask += p_mask + [False] * (len(fixed) - len(p_ids) + len(supervised))
        ex.labels += [IGNORE] * len(fixed) + supervised
        ex.input_ids += fixed
        if body or eot:
            ex.targets += (target,)
            ex.spans += ((len(ex.input_ids), len(ex.input_ids) + len(supervised)),)
        ex.input_ids += supervised
        if keep < len(b_ids):  # a cut target ends the sample
            ex.truncated, ex.dropped_turns = True, sum(1 for x in parts[n + 1:] if x[2] or x[3])
            break
    if num_queries and sum(ex.image_mask) != num_queries:
        raise PromptError(f"the rendered prompt does not hold the image placeholder {placeholder!r}: does the "
                          "chat template drop the user's text?")
    return ex


def check_labels(tokenizer, example: Example) -> None:
    """Raise ``PromptError`` unless the supervised tokens of every kept assistant turn decode to its
    target (the last one a prefix if truncated) and nothing else is supervised."""
    positions = [i for i, label in enumerate(example.labels) if label != IGNORE]
    if any(example.labels[i] != example.input_ids[i] or example.image_mask[i] for i in positions):
        raise PromptError("labels must copy input_ids at supervised positions and never cover image slots")
    for n, (target, (start, end)) in enumerate(zip(example.targets, example.spans)):
        got = tokenizer.decode([t for t in example.labels[start:end] if t != IGNORE], skip_special_tokens=True).strip()
        want = target.strip()
        cut = example.truncated and n == len(example.targets) - 1
        if got != want and not (cut and want.startswith(got.rstrip("\ufffd").rstrip())):
            raise PromptError(
                "the label tokens do not decode to the target: the chat template and the label mask disagree "
                f"(does the template change or drop the assistant's text?)\n labels decode to: {got!r}\n "
                f"target:           {want!r}")
    if len(positions) != sum(end - start for start, end in example.spans):
        raise PromptError(f"{len(positions)} supervised tokens, but the assistant turns span "
                          f"{sum(end - start for start, end in example.spans)}: a user or system turn is supervised")


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


def pick_conversation(record: dict, cfg_llm, rng: random.Random, caption_prob: float = 0.5) -> Conversation:
    """What one record trains on, drawn from ``rng`` only.

    A record with a conversation (``messages``) trains on the whole of it; if it also has its own
    caption (not just a copy of an answer), the caption task is chosen with probability
    ``caption_prob``. A caption task pairs the caption with a drawn user prompt. The record's own
    system turn replaces the configured system prompt."""
    system, user = pick_prompts(cfg_llm, rng)
    messages = record.get("messages") or []
    answers = {m["content"] for m in messages if m["role"] == "assistant"}
    caption = record.get("caption") or ""
    own_caption = bool(caption) and caption not in answers
    if not answers or (own_caption and rng.random() < caption_prob):
        system = next((m["content"] for m in messages if m["role"] == "system"), system)
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]
        return Conversation(([{"role": "system", "content": system}] if system else []) + chat, "caption")
    if messages[0]["role"] != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    return Conversation(list(messages), "chat")


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
