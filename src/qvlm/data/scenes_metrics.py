"""Read a synthetic-scene caption back into objects, and score captions against scene attributes.

``parse_caption`` inverts ``synth.describe`` and tolerates the variants a model may write (plurals,
"big"/"little", "centre"/"middle", missing sizes or positions): each shape word closes one object,
taking the colour and size words seen since the previous object; a position word that follows
attaches to the object before it. Scores (each True/False per caption, averaged by ``score_captions``):

- ``color_shape``: the multiset of (colour, shape) named equals the truth (composition);
- ``count``: as many objects as the truth;
- ``exact``: the set of (position, size, colour, shape) equals the truth.
"""

from __future__ import annotations

import re
from collections import Counter

from qvlm.data.synth import COLORS, POSITIONS, SHAPES, SIZES

ALIASES = {"circles": "circle", "squares": "square", "triangles": "triangle", "big": "large",
           "little": "small", "centre": "center", "middle": "center", "grey": "gray"}
WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> list[dict]:
    """"a large red circle on the left and ..." -> [{"size", "color", "shape", "position"}, ...]."""
    objects: list[dict] = []
    pending: dict = {}
    for word in WORD.findall(text.lower()):
        word = ALIASES.get(word, word)
        if word in COLORS:
            pending["color"] = word
        elif word in SIZES:
            pending["size"] = word
        elif word in SHAPES:
            objects.append({"size": pending.get("size"), "color": pending.get("color"), "shape": word,
                            "position": None})
            pending = {}
        elif word in POSITIONS and objects and objects[-1]["position"] is None and not pending:
            objects[-1]["position"] = word
    return objects


def truth_objects(attributes: dict) -> list[dict]:
    """Scene attributes {position: None | {...}} -> objects in position order."""
    return [{"size": a["size"], "color": a["color"], "shape": a["shape"], "position": p}
            for p in POSITIONS if (a := attributes.get(p))]


def as_objects(pred: str | list[dict]) -> list[dict]:
    return parse_caption(pred) if isinstance(pred, str) else pred


def color_shape(pred: str | list[dict], attributes: dict) -> bool:
    got = Counter((o["color"], o["shape"]) for o in as_objects(pred))
    return got == Counter((o["color"], o["shape"]) for o in truth_objects(attributes))


def count(pred: str | list[dict], attributes: dict) -> bool:
    return len(as_objects(pred)) == len(truth_objects(attributes))


def exact(pred: str | list[dict], attributes: dict) -> bool:
    def key(o: dict) -> tuple:
        return (o["position"], o["size"], o["color"], o["shape"])

    got = [key(o) for o in as_objects(pred)]
    want = [key(o) for o in truth_objects(attributes)]
    return len(got) == len(set(got)) and set(got) == set(want)


def score_captions(preds: list[str], attributes: list[dict]) -> dict:
    """Mean of each score over paired (caption, attributes) lists, plus ``n``."""
    if len(preds) != len(attributes):
        raise ValueError(f"{len(preds)} captions but {len(attributes)} attribute sets")
    n = len(preds)
    scores = {"color_shape": 0, "count": 0, "exact": 0}
    for pred, attrs in zip(preds, attributes, strict=True):
        objects = parse_caption(pred)
        scores["color_shape"] += color_shape(objects, attrs)
        scores["count"] += count(objects, attrs)
        scores["exact"] += exact(objects, attrs)
    return {**{k: (v / n if n else 0.0) for k, v in scores.items()}, "n": n}
