"""``qvlm smoke``: an end-to-end smoke run of the composed model.

Builds every block from the config, pushes one drawn image through vision -> Q-Former -> projector
-> LLM (untrained bridge: the point is that every shape and every source resolves), and asks the
LLM a text-only question with its own chat template.
"""

from __future__ import annotations

import time

import torch
from PIL import Image, ImageDraw

from qvlm.config import Config
from qvlm.models.vlm import VLM


def drawn_image(size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="red")
    return img


@torch.no_grad()
def run_smoke(cfg: Config, prompt: str, max_new_tokens: int = 24) -> dict:
    start = time.perf_counter()
    model = VLM.from_config(cfg, with_llm=True).eval()
    built_s = time.perf_counter() - start
    pixels = model.vision.processor([drawn_image(model.vision.image_size)])  # (1, 3, H, W)
    feats = model.image_features(pixels)  # (1, N, Dv)
    tokens = model.image_tokens(feats)  # (1, Q, Dlm)
    tok = model.llm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.llm.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {
        "vision_tokens": list(feats.shape),
        "image_tokens": list(tokens.shape),
        "parameters": model.parameter_counts(),
        "prompt": prompt,
        "answer": answer,
        "build_s": round(built_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
    }
