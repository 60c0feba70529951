"""Text replay for stage 2: the base LLM's own answers to text-only instructions, trained beside the
images so that the LoRA adapters leave plain chat as it was.

Stage 2 trains the adapters on short, formulaic captions only; nothing in that data holds back
what the adapters do to text-only chat (in the demo the adapted model shortened and rephrased its
answers and lost facts the base knew). The usual remedy is to mix text-only
instruction data into the image data. None installs offline, so the targets are the base model's
own greedy answers (adapters off) to everyday instructions: a packaged list
(``replay_prompts.txt``, one per line) or a file of the user's own. The loss on them
(``qvlm.train.steps.replay_loss``) is the KL divergence from the base model's next-token
distributions over the answer (``train.replay_loss=kl``, the default: the whole distribution, so
near-ties the base model resolves one way stay that way) or the cross-entropy of the answer tokens
(``ce``). This is self-distillation: it asks the adapted model to answer as the base did and
teaches it nothing new. Two kinds of answer are dropped and counted: one that mentions an excluded
word (the training loop excludes the retention facts' keywords, so replay never rehearses an
evaluated fact), and one that ran out of tokens with no sentence end to cut at.

Each stage-2 step adds ``train.replay_batch_size`` replay samples, read in a permutation fixed by
(seed, epoch); the position is part of the data state, so a resumed run continues exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

import torch

from qvlm.data.collate_stage2 import pad_examples
from qvlm.models.generate import GenerationConfig, generate, pad_left
from qvlm.models.llm import LanguageModel
from qvlm.prompt import Example, build_example, check_batch, check_labels

# The base model's answers are cut at this many tokens (an unfinished one at its last sentence
# end): the first sentences are what a fact question turns on, and shorter samples cost less.
MAX_ANSWER_TOKENS = 40


def load_prompts(path: str | Path = "") -> list[str]:
    """Instructions, one per line (blank lines and lines starting with # skipped); "" = the packaged list."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"data.replay_prompts: cannot read {path}: {exc}") from exc
    else:
        text = resources.files("qvlm.train").joinpath("replay_prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"data.replay_prompts: no instructions in {path or 'the packaged list'}")
    return prompts


def finished_answer(text: str, finished: bool) -> str | None:
    """The answer as a training target: whole if it ended by itself, else cut after its last
    sentence end (None when there is none)."""
    text = text.strip()
    if finished:
        return text or None
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[: ends[-1]] if ends else None


def mentions(text: str, words: Iterable[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text, re.IGNORECASE) for w in words)


@dataclass
class ReplaySet:
    pairs: list[tuple[str, str]]  # (instruction, the base model's answer)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count


@torch.no_grad()
def base_answers(lm: LanguageModel, prompts: list[str], exclude: Iterable[str] = (), batch_size: int = 32,
                 max_new_tokens: int = MAX_ANSWER_TOKENS) -> ReplaySet:
    """The base model's (adapters off) greedy answers to ``prompts``, asked through its chat
    template with no system turn, as a user would ask them."""
    from qvlm.prompt import end_of_turn_ids

    tok, exclude = lm.tokenizer, list(exclude)
    device = lm.model.get_input_embeddings().weight.device
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    pairs, dropped = [], {"unfinished": 0, "excluded": 0}
    with lm.adapters_disabled():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            examples = [build_example(tok, 0, p, None) for p in chunk]
            ids, mask, _ = pad_left([e.input_ids for e in examples], None, tok.pad_token_id)
            out = generate(lm, lm.embed(ids.to(device)), mask.to(device), tok, gen, end_of_turn_ids(tok))
            for prompt, text, reason in zip(chunk, out.texts, out.finish_reasons, strict=True):
                answer = finished_answer(text, reason == "stop")
                if answer is None:
                    dropped["unfinished"] += 1
                elif mentions(answer, exclude) or mentions(prompt, exclude):
                    dropped["excluded"] += 1
                else:
                    pairs.append((prompt, answer))
    if not pairs:
        raise ValueError(f"text replay: no usable answers from {len(prompts)} instructions (dropped: {dropped})")
    return ReplaySet(pairs, dropped)


def replay_examples(tokenizer, pairs: list[tuple[str, str]], max_len: int) -> list[Example]:
    """Text-only chat samples (no system turn, no image), labels on the answer + end of turn."""
    examples = []
    for prompt, answer in pairs:
        example = build_example(tokenizer, 0, prompt, answer, max_len=max_len)
        check_labels(tokenizer, example)
        examples.append(example)
    return examples


class ReplayBatches:
    """Endless batches of replay examples, in a per-epoch permutation fixed by ``seed``."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int = 0):
        if not examples or batch_size < 1:
            raise ValueError("ReplayBatches needs examples and batch_size >= 1")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.position = 0, 0

    def order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 17)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask", "labels"} (B, T) on ``device``; no image slots."""
        picked = []
        while len(picked) < self.batch_size:
            order = self.order()
            take = order[self.position:self.position + self.batch_size - len(picked)]
            picked += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        batch = pad_examples([self.examples[i] for i in picked], self.pad_id)
        check_batch(batch["labels"])
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("examples", len(self.examples))) != len(self.examples):
            raise ValueError(f"text replay: the checkpoint read {state['examples']} replay examples, this run has "
                             f"{len(self.examples)} (were the replay prompts or the base model changed?)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
