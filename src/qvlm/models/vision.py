"""VisionEncoder: a frozen, eval-locked Hugging Face vision tower, pixels -> (B, N, Dv).

The image backbone of BLIP-2 (paper §3.1: a frozen ViT whose penultimate or last layer feeds the
Q-Former). Any HF vision tower works: ViT, DINOv2, the vision half of CLIP or SigLIP (a full
two-tower checkpoint is cut down to its ``vision_model``), and BLIP-2's own ``Blip2VisionModel``.
``layer="last_unnormed"`` reads the last block's output before the tower's final LayerNorm: the
Q-Former's own image LayerNorm takes that norm's place (LAVIS's ``ln_vision``), with its epsilon. Its ``ImageProcessor`` is a small,
deterministic resize + normalise read from the checkpoint's ``preprocessor_config.json``, so the
data pipeline and the feature cache share one definition of "the pixels this tower expects".

With ``grey_view`` the tower also encodes a grey copy of each image (ITU-R BT.601 luminance in all
three channels), and each feature token carries both views of its patch, colour first: (B, N, 2Dv).
A tower pretrained to read shapes from grey images (``qvlm pretrain-vision --grey-view``) then gives
the Q-Former shape evidence that colour cannot bias (for colour-shape pairs it never trained on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from qvlm import model_sources as sources

LAYERS = ("last", "penultimate", "last_unnormed")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: RGB -> grey (the weights sum to 1)
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImageProcessor:
    """RGB PIL images -> normalised float tensor (B, 3, H, W)."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"
    crop: bool = False  # resize the shortest edge to ``size`` then centre-crop (CLIP); else squash

    def __call__(self, images: list[Image.Image]) -> Tensor:
        arrays = [self.to_array(img) for img in images]
        pixels = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def to_array(self, img: Image.Image) -> np.ndarray:
        if img.mode != "RGB":
            img = img.convert("RGB")
        method = RESAMPLE[self.resample]
        if not self.crop:
            return np.asarray(img.resize((self.size, self.size), method), dtype=np.uint8)
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), method)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return np.asarray(img.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)

    def settings(self) -> dict:
        return asdict(self)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, fallback_size: int) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` (HF format); missing fields take ViT defaults."""
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size=fallback_size)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise sources.SourceError(f"{file}: unreadable image processor config: {exc}") from exc
        size = data.get("crop_size") or data.get("size") or fallback_size
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge") or fallback_size
        crop = bool(data.get("do_center_crop", False))
        return cls(
            size=int(size),
            mean=tuple(float(x) for x in data.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(float(x) for x in data.get("image_std", (0.5, 0.5, 0.5))),
            resample=PIL_CODES.get(data.get("resample", 3), "bicubic"),
            crop=crop,
        )


def to_grey(pixel_values: Tensor, processor: ImageProcessor) -> Tensor:
    """Pixels normalised by ``processor`` (B, 3, H, W) -> the same images in grey, normalised the same way."""
    mean = torch.tensor(processor.mean, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.std, device=pixel_values.device).view(1, 3, 1, 1)
    weights = torch.tensor(LUMA, device=pixel_values.device).view(1, 3, 1, 1)
    luma = ((pixel_values.float() * std + mean) * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W) in [0, 1]
    return ((luma - mean) / std).to(pixel_values.dtype)  # (B, 3, H, W)


class VisionEncoder(nn.Module):
    """A frozen HF vision tower. ``forward(pixels (B, 3, H, W)) -> (B, N, Dv)``."""

    def __init__(self, tower: nn.Module, processor: ImageProcessor, layer: str = "last",
                 drop_cls: bool = False, source: str = "", grey_view: bool = False):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {layer!r}")
        self.tower = tower
        self.processor = processor
        self.layer = layer
        self.drop_cls = drop_cls
        self.grey_view = grey_view
        self.source = source
        self._fingerprint: str | None = None
        self._num_tokens: int | None = None
        self.tower.requires_grad_(False)
        self.tower.eval()

    @classmethod
    def from_source(cls, source: str, layer: str = "last", drop_cls: bool = False,
                    seed: int = 0, trust_remote_code: bool = False, grey_view: bool = False) -> "VisionEncoder":
        from transformers import AutoModel, Blip2VisionModel

        src = sources.resolve(source)
        # BLIP-2's tower (a folder that ``qvlm import blip2`` wrote) has no AutoModel entry
        blip2 = sources.load_hf_config(src, trust_remote_code).model_type == "blip_2_vision_model"
        model = sources.load_model(src, Blip2VisionModel if blip2 else AutoModel, seed=seed,
                                   trust_remote_code=trust_remote_code)
        tower = getattr(model, "vision_model", model)  # CLIP / SigLIP two-tower -> the vision half
        size = int(getattr(tower.config, "image_size", 224))
        if src.kind == "dir":
            processor = ImageProcessor.from_pretrained_dir(src.path, size)
        else:
            processor = ImageProcessor(size=size)
        return cls(tower, processor, layer=layer, drop_cls=drop_cls, source=source, grey_view=grey_view)

    def train(self, mode: bool = True) -> "VisionEncoder":
        """The tower stays in eval mode (frozen: no dropout, fixed norms) whatever the caller asks."""
        super().train(mode)
        self.tower.eval()
        return self

    @property
    def width(self) -> int:
        """Dv, the width of a feature token (twice the tower's with ``grey_view``)."""
        return int(self.tower.config.hidden_size) * (2 if self.grey_view else 1)

    @property
    def norm_eps(self) -> float | None:
        """With ``layer="last_unnormed"``: the epsilon of the final LayerNorm the features skip."""
        return float(getattr(self.tower.config, "layer_norm_eps", 1e-5)) if self.layer == "last_unnormed" else None

    @property
    def image_size(self) -> int:
        return self.processor.size

    @property
    def num_tokens(self) -> int:
        """N, the number of feature tokens per image (found with one forward pass on a blank image)."""
        if self._num_tokens is None:
            blank = torch.zeros(1, 3, self.image_size, self.image_size)
            self._num_tokens = int(self.forward(blank).shape[1])
        return self._num_tokens

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.grey_view:  # one tower pass over both copies; a patch's two views side by side in one token
            both = self.encode(torch.cat([pixel_values, self.grey(pixel_values)]))  # (2B, N, Dv)
            colour, grey = both.chunk(2)
            return torch.cat([colour, grey], dim=-1)  # (B, N, 2Dv)
        return self.encode(pixel_values)

    def grey(self, pixel_values: Tensor) -> Tensor:
        return to_grey(pixel_values, self.processor)

    def encode(self, pixel_values: Tensor) -> Tensor:
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if self.layer == "last":
            feats = self.tower(pixel_values=pixel_values).last_hidden_state  # (B, N, Dv)
        else:  # hidden_states: the embeddings, then each block's output (before any final norm)
            hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            feats = hidden[-2] if self.layer == "penultimate" else hidden[-1]  # (B, N, Dv)
        if self.drop_cls:
            feats = feats[:, 1:]  # (B, N-1, Dv)
        return feats

    def fingerprint(self) -> str:
        """A hash of the weights, layer choice, pixel settings and views: keys the frozen-feature cache."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            meta = {"layer": self.layer, "drop_cls": self.drop_cls, "processor": self.processor.settings()}
            if self.grey_view:  # absent when off, so caches built before the option stay valid
                meta["grey_view"] = True
            digest.update(json.dumps(meta, sort_keys=True).encode())
            for name, tensor in sorted(self.tower.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint


def fit_blip2_attention_biases(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """A ``Blip2VisionModel`` state in the bias layout that the installed transformers expects: one
    ``self_attn.qkv.bias`` (newer) or ``q_bias`` and ``v_bias`` (older; the key bias is then dropped,
    exactly: it adds the same amount to every attention logit of a query, which softmax ignores)."""
    state = dict(state)
    for name in [k for k in state if k.endswith("self_attn.q_bias")]:
        base = name.removesuffix("q_bias")
        if f"{base}qkv.bias" in expected:
            q, v = state.pop(name), state.pop(f"{base}v_bias")
            state[f"{base}qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for name in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        base = name.removesuffix("qkv.bias")
        if f"{base}q_bias" in expected:
            q, _, v = state.pop(name).chunk(3)
            state[f"{base}q_bias"], state[f"{base}v_bias"] = q, v
    return state
