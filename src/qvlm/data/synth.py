"""Synthetic scenes: the embedded default data set and the composition benchmark (issue 3).

Each image (64 px by default) holds 1-3 objects on a light background. An object has a shape
(circle, square, triangle), a colour (red, green, blue, yellow, purple, orange), a size (small,
large) and a position (left, right, top, bottom, center; at most one object per position), drawn
with a small jitter in place and colour. Everything is a pure function of (seed, split, index).

Captions list the objects in the fixed position order left, right, top, bottom, center:
"a large red circle on the left, a small blue square at the top and a small green triangle in the
center". Question-answer pairs about the same scene ("what colour is the square?" -> "blue") are
stored as a chat in ``messages``; ``attributes`` maps every position to None or
{"color", "shape", "size"}.

Splits: ``train`` never contains a held-out colour-shape pair (default: purple triangle, green circle,
orange square); ``test`` is i.i.d. new images of the same (seen) distribution; in ``heldout`` every
image contains at least one held-out pair (its other objects may be any pair).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from qvlm.data.records import DEFAULT_LIMITS, Limits, make_record

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 45, 45), "green": (45, 160, 70), "blue": (45, 85, 215),
          "yellow": (230, 200, 40), "purple": (135, 60, 175), "orange": (240, 135, 35)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")  # also the caption order
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the center"}
CENTERS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
RADIUS = {"small": 0.075, "large": 0.13}  # fraction of the image side
JITTER_PLACE = 0.02  # max centre offset, fraction of the side
JITTER_COLOR = 12  # max offset per RGB channel
BACKGROUND = 240
NUMBERS = ("zero", "one", "two", "three")
DEFAULT_HELDOUT = (("purple", "triangle"), ("green", "circle"), ("orange", "square"))
SPLITS = ("train", "test", "heldout")
SUPERSAMPLE = 4  # draw big, downsample with a box filter: anti-aliased edges
QA_PER_IMAGE = 3


@dataclass(frozen=True)
class SceneObject:
    position: str
    color: str
    shape: str
    size: str
    dx: float  # centre jitter, fraction of the side
    dy: float
    rgb: tuple[int, int, int]  # jittered colour


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in POSITIONS order
    background: int
    qa: tuple[tuple[str, str, str], ...]  # (question, answer, type)

    def attributes(self) -> dict:
        attrs: dict = {p: None for p in POSITIONS}
        for o in self.objects:
            attrs[o.position] = {"color": o.color, "shape": o.shape, "size": o.size}
        return attrs

    def caption(self) -> str:
        return describe([(o.size, o.color, o.shape, o.position) for o in self.objects])

    def messages(self) -> list[dict]:
        chat = []
        for q, a, kind in self.qa:
            chat += [{"role": "user", "content": q, "type": kind}, {"role": "assistant", "content": a}]
        return chat


def describe(objects: list[tuple[str, str, str, str]]) -> str:
    """[(size, colour, shape, position), ...] in position order -> "a ..., a ... and a ..."."""
    parts = [f"a {size} {color} {shape} {PHRASES[pos]}" for size, color, shape, pos in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"qvlm-synth:{seed}:{split}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def seen_pairs(heldout) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(heldout)]


def make_scene(seed: int, split: str, index: int, heldout=DEFAULT_HELDOUT) -> Scene:
    """The scene at ``index`` of ``split``: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {', '.join(SPLITS)}, got {split!r}")
    heldout = tuple(tuple(p) for p in heldout)
    rng = scene_rng(seed, split, index)
    k = rng.randint(1, 3)
    positions = sorted(rng.sample(POSITIONS, k), key=POSITIONS.index)
    seen = seen_pairs(heldout)
    every = [(c, s) for c in COLORS for s in SHAPES]
    special = rng.randrange(k) if split == "heldout" else -1
    objects = []
    for i, pos in enumerate(positions):
        if split == "heldout":
            color, shape = rng.choice(heldout) if i == special else rng.choice(every)
        else:
            color, shape = rng.choice(seen)
        size = rng.choice(SIZES)
        dx, dy = rng.uniform(-JITTER_PLACE, JITTER_PLACE), rng.uniform(-JITTER_PLACE, JITTER_PLACE)
        rgb = tuple(min(255, max(0, c + rng.randint(-JITTER_COLOR, JITTER_COLOR))) for c in COLORS[color])
        objects.append(SceneObject(pos, color, shape, size, dx, dy, rgb))
    background = BACKGROUND + rng.randint(-8, 8)
    qa = questions(objects, seen, rng)
    return Scene(tuple(objects), background, qa)


def questions(objects: list[SceneObject], seen, rng: random.Random) -> tuple[tuple[str, str, str], ...]:
    """The count question plus up to two others drawn from what the scene can answer unambiguously;
    each (question, answer, type), type one of count, shape, colour, size, yes/no."""
    shapes = [o.shape for o in objects]
    pool = []
    for o in objects:
        where = PHRASES[o.position]
        pool.append((f"what shape is {where}?", o.shape, "shape"))
        pool.append((f"what colour is the object {where}?", o.color, "colour"))
        if shapes.count(o.shape) == 1:
            pool.append((f"what colour is the {o.shape}?", o.color, "colour"))
            pool.append((f"what size is the {o.shape}?", o.size, "size"))
    present = {(o.color, o.shape) for o in objects}
    color, shape = rng.choice(sorted(present))
    pool.append((f"is there a {color} {shape}?", "yes", "yes/no"))
    absent = [p for p in seen if p not in present]
    if absent:
        color, shape = rng.choice(absent)
        pool.append((f"is there a {color} {shape}?", "no", "yes/no"))
    empty = [p for p in POSITIONS if p not in {o.position for o in objects}]
    if empty:
        pool.append((f"is there anything {PHRASES[rng.choice(empty)]}?", "no", "yes/no"))
    picked = rng.sample(pool, min(QA_PER_IMAGE - 1, len(pool)))
    return (("how many objects are there?", NUMBERS[len(objects)], "count"), *picked)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene at ``size`` x ``size`` pixels (RGB)."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = CENTERS[o.position]
        cx, cy, r = (cx + o.dx) * big, (cy + o.dy) * big, RADIUS[o.size] * big
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=o.rgb)
        elif o.shape == "square":
            h = 0.85 * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=o.rgb)
        else:  # equilateral triangle, point up, centroid at the centre
            t = 1.25 * r
            draw.polygon([(cx, cy - t), (cx - 0.866 * t, cy + t / 2), (cx + 0.866 * t, cy + t / 2)], fill=o.rgb)
    return img.resize((size, size), Image.Resampling.BOX)


def split_sizes(n: int, n_test: int | None = None, n_heldout: int | None = None) -> dict[str, int]:
    """Train ``n``; test and heldout default to max(200, n // 10)."""
    default = max(200, n // 10)
    return {"train": n, "test": default if n_test is None else n_test,
            "heldout": default if n_heldout is None else n_heldout}


class SynthScenes(Dataset):
    """Map-style dataset of synthetic scenes, generated on the fly per index (nothing stored)."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", image_size: int = 64,
                 heldout=DEFAULT_HELDOUT, limits: Limits = DEFAULT_LIMITS):
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.seed, self.split, self.image_size = n, seed, split, image_size
        self.heldout = tuple(tuple(p) for p in heldout)
        self.limits = limits

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        return make_scene(self.seed, self.split, index, self.heldout)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        scene = self.scene(index)
        return make_record(f"{self.split}-{index:06d}", render(scene, self.image_size), scene.caption(),
                           scene.messages(), scene.attributes(), self.limits)

    def caption_lengths(self) -> list[int]:
        return [len(self.scene(i).caption()) for i in range(self.n)]


def write_split(out: str | Path, split: str, n: int, seed: int = 0, image_size: int = 64,
                heldout=DEFAULT_HELDOUT) -> Path:
    """Write ``out/{split}.jsonl`` and ``out/images/{split}-NNNNNN.png``; returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            scene = make_scene(seed, split, i, heldout)
            name = f"images/{split}-{i:06d}.png"
            render(scene, image_size).save(out / name, format="PNG")
            line = {"key": f"{split}-{i:06d}", "image": name, "caption": scene.caption(),
                    "messages": scene.messages(), "attributes": scene.attributes()}
            f.write(json.dumps(line) + "\n")
    tmp.replace(path)
    return path
