"""Captioning and chat with a trained VLM: prompts from the LLM's chat template with image slots,
frozen image features, then KV-cached generation (``qvlm.models.generate``).

    model = VLM.from_pretrained("run/model").eval()
    caption(model, [image])              # ["a red circle on the left ..."]
    chat(model, image, "How many shapes?")
    score(model, [image], ["a red circle"])  # ITC similarity and ITM match probability (stage 1)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from qvlm.models.generate import GenerationConfig, GenerationOutput, StepCallback, generate_from_images, pad_left
from qvlm.models.stage1 import itm_match_prob
from qvlm.model_sources import load_tokenizer
from qvlm.prompt import build_chat, build_example, decoder_start_id, end_of_turn_ids


def default_prompts(vlm) -> tuple[str | None, str]:
    llm_cfg = vlm.config.model.llm
    return (llm_cfg.system_prompts[0] if llm_cfg.system_prompts else None), llm_cfg.user_prompts[0]


def default_prompt_len(vlm) -> int:
    """Tokens of the default generation prompt (chat template and image slots included)."""
    system, user = default_prompts(vlm)
    return int(prompt_batch(vlm, [user], system)[0].shape[1])


def prompt_batch(vlm, users: list[str], system: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded generation prompts (B, T) with each row's Q image slots marked in image_mask."""
    tok = vlm.llm.tokenizer
    q = vlm.qformer.num_queries
    llm = vlm.config.model.llm
    examples = [build_example(tok, q, user, None, system, llm.image_placeholder, image_position=llm.image_position)
                for user in users]
    return pad_left([e.input_ids for e in examples], [e.image_mask for e in examples], tok.pad_token_id)


@torch.no_grad()
def describe_embeds(vlm, image_embeds: Tensor, prompts: list[str] | None = None, system: str | None = None,
                    gen: GenerationConfig | None = None, on_step: StepCallback | None = None) -> GenerationOutput:
    """Frozen features (B, N, Dv) -> one answer per image (to ``prompts``, default: the first user
    prompt); ``on_step``: see ``qvlm.models.generate``."""
    sys_default, user_default = default_prompts(vlm)
    users = prompts or [user_default] * image_embeds.shape[0]
    if len(users) != image_embeds.shape[0]:
        raise ValueError(f"{len(users)} prompts for {image_embeds.shape[0]} images")
    ids, mask, image_mask = prompt_batch(vlm, users, system if system is not None else sys_default)
    device = image_embeds.device
    return generate_from_images(vlm, image_embeds, ids.to(device), mask.to(device), image_mask.to(device),
                                gen or GenerationConfig(), eos_token_ids=end_of_turn_ids(vlm.llm.tokenizer),
                                on_step=on_step)


def image_feats(vlm, images: list[Image.Image]) -> Tensor:
    """RGB images -> the frozen tower's features (B, N, Dv), on the model's device."""
    device = next(vlm.qformer.parameters()).device
    return vlm.image_features(vlm.vision.processor(images).to(device))


@torch.no_grad()
def answer_in_batches(vlm, images: list[Image.Image], prompts: list[str] | None, gen: GenerationConfig | None,
                      batch_size: int, progress: bool = False) -> list[str]:
    """One answer per image, to its prompt (None: the model's first user prompt), ``batch_size`` at a time."""
    texts: list[str] = []
    for start in tqdm(range(0, len(images), batch_size), desc="answering", unit="batch", file=sys.stderr,
                      disable=not progress):
        feats = image_feats(vlm, images[start:start + batch_size])  # (B, N, Dv)
        chunk = prompts[start:start + batch_size] if prompts else None
        texts.extend(t.strip() for t in describe_embeds(vlm, feats, chunk, gen=gen).texts)
    return texts


def caption(vlm, images: list[Image.Image], prompt: str | None = None, gen: GenerationConfig | None = None,
            batch_size: int = 16) -> list[str]:
    """Captions for RGB images, generated in batches."""
    return answer_in_batches(vlm, images, [prompt] * len(images) if prompt else None, gen, batch_size)


@torch.no_grad()
def chat(vlm, image: Image.Image, messages: str | list[dict], gen: GenerationConfig | None = None) -> str:
    """Answer about one image. ``messages``: a question, or a whole conversation ({"role", "content"}:
    system, user and assistant turns, ending with the user turn to answer), replayed through the chat
    template; the image goes in the user turn that holds the placeholder, else the first. Without a
    system turn the model's default system prompt is used."""
    ex = chat_example(vlm, [{"role": "user", "content": messages}] if isinstance(messages, str) else messages)
    feats = image_feats(vlm, [image])
    device = feats.device
    ids, mask = torch.tensor([ex.input_ids], device=device), torch.tensor([ex.image_mask], device=device)
    out = generate_from_images(vlm, feats, ids, torch.ones_like(ids), mask, gen or GenerationConfig(),
                               eos_token_ids=end_of_turn_ids(vlm.llm.tokenizer))
    return out.texts[0].strip()


def chat_example(vlm, messages: list[dict]):
    """The generation prompt of a conversation (``qvlm.prompt.build_chat``) with the model's defaults."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("chat needs a conversation that ends with a user message")
    system, _ = default_prompts(vlm)
    if messages[0].get("role") != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    llm = vlm.config.model.llm
    return build_chat(vlm.llm.tokenizer, vlm.qformer.num_queries, messages, llm.image_placeholder,
                      image_position=llm.image_position)


@torch.no_grad()
def qformer_caption(vlm, images: list[Image.Image], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy captions from the stage-1 Q-Former itself (queries -> [DEC] -> ITG head), no LLM:
    shows what the queries carry before stage 2 (``qvlm eval caption`` on a stage-1 model)."""
    vlm.require_text("Q-Former captioning")
    q = vlm.config.model.qformer
    tok = qformer_tokenizer(vlm)
    dec, sep = decoder_start_id(tok), tok.sep_token_id
    device = next(vlm.qformer.parameters()).device
    texts: list[str] = []
    for start in range(0, len(images), batch_size):
        feats = image_feats(vlm, images[start:start + batch_size])
        cache = vlm.qformer(image_embeds=feats, return_query_cache=True).query_cache
        ids = torch.full((feats.shape[0], 1), dec, device=device)  # (B, 1) -> (B, 1 + steps)
        for _ in range(min(max_new_tokens, q.max_text_len - 1)):
            text = vlm.qformer(input_ids=ids, attention_mask=torch.ones_like(ids), query_cache=cache,
                               mode="causal").text  # (B, t, Dq): the full prefix, no text cache
            ids = torch.cat([ids, vlm.heads.lm_head(text[:, -1]).argmax(-1, keepdim=True)], dim=1)
            if sep is not None and bool((ids == sep).any(dim=1).all()):
                break
        for row in ids[:, 1:].tolist():
            texts.append(tok.decode(row[:row.index(sep)] if sep in row else row, skip_special_tokens=True).strip())
    return texts


def answer_questions(vlm, images: list[Image.Image], questions: list[str], batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers, one per (image, question), each asked alone with the model's default system prompt."""
    return answer_in_batches(vlm, images, questions, GenerationConfig(max_new_tokens=max_new_tokens), batch_size,
                             progress)


@torch.no_grad()
def describe_images(vlm, images: list[Image.Image], batch_size: int = 16, max_new_tokens: int = 32,
                    progress: bool = False, compile: bool = False) -> list[str]:
    """Greedy captions (the model's first user prompt); a stage-1 model (no LLM) captions with the
    Q-Former's own ITG head. ``compile``: compiled decoding steps (stage-2 models only)."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, compile=compile)
    out: list[str] = []
    bar = tqdm(total=len(images), desc="captioning", unit="img", file=sys.stderr, disable=not progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if vlm.llm is None:
            out.extend(qformer_caption(vlm, chunk, max_new_tokens, batch_size))
        else:
            out.extend(caption(vlm, chunk, gen=gen, batch_size=batch_size))
        bar.update(len(chunk))
    bar.close()
    return out


def qformer_tokenizer(vlm):
    q = vlm.config.model.qformer
    return load_tokenizer(q.tokenizer or q.source, vlm.config.model.trust_remote_code)


@dataclass
class Scores:
    itc: Tensor  # (I, T) ITC similarity: the cosine of the best-matching query, before the temperature
    itm: Tensor  # (I, T) ITM match probability
    image_embeds: Tensor  # (I, Q, E) normalised, one per query
    text_embeds: Tensor  # (T, E) normalised ([CLS])


@torch.no_grad()
def score(vlm, images: list[Image.Image], texts: list[str], batch_size: int = 32) -> Scores:
    """Every image against every text with a stage-1 model (trained or imported): rows are images."""
    vlm.require_text("scoring")
    if not images or not texts:
        raise ValueError("score needs at least one image and one text")
    was_training = vlm.training
    vlm.eval()
    try:
        device = next(vlm.qformer.parameters()).device
        feats = torch.cat([image_feats(vlm, images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])  # (I, N, Dv)
        enc = qformer_tokenizer(vlm)(texts, padding="longest", truncation=True, return_tensors="pt",
                                     max_length=vlm.config.model.qformer.max_text_len).to(device)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (T, L)
        image_embeds = vlm.heads.image_feats(vlm.qformer(image_embeds=feats).query)  # (I, Q, E)
        text_embeds = vlm.heads.text_feat(vlm.qformer(input_ids=ids, attention_mask=mask).text)  # (T, E)
        itc = torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(dim=-1)  # (I, T)
        pairs = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts))).to(device)  # (I*T, 2)
        itm = torch.cat([itm_match_prob(vlm.qformer, vlm.heads, feats[p[:, 0]], ids[p[:, 1]], mask[p[:, 1]])
                         for p in pairs.split(batch_size)])  # (I*T,)
        return Scores(itc=itc, itm=itm.view(len(images), len(texts)), image_embeds=image_embeds,
                      text_embeds=text_embeds)
    finally:
        vlm.train(was_training)
