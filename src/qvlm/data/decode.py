"""Robust decoding of one record: image bytes or path -> RGB PIL image, raw caption -> clean text.

Every failure is a ``SkipRecord(reason)``; a caller counts it in a ``SkipCounter`` and moves on, so a
run never crashes on data (issue 3, "Robust decoding"). Reasons:

- ``missing_file``, ``empty_file``, ``not_an_image``, ``truncated``, ``corrupt`` (decodes, then fails),
  ``too_many_pixels`` (width x height over the per-call limit: checked from the header, before any
  pixel is decoded, so decompression bombs cost nothing; PIL's own hard stop at 2 x
  ``Image.MAX_IMAGE_PIXELS``, about 179 M pixels, also lands here), ``too_small`` (only when
  ``min_side`` > 1);
- ``bad_caption_empty`` (missing, null or blank caption), ``bad_caption_encoding`` (not valid UTF-8),
  ``bad_messages`` (not a list of {"role", "content"} turns with an assistant reply);
- ``bad_line`` (a JSONL line that is not a JSON object), ``bad_shard`` (an unreadable tar shard),
  ``not_in_cache`` (a feature-cache lookup that missed).

Choices: a 1x1 or extremely elongated image is *used* (the image processor resizes it); pass
``min_side`` to skip tiny ones instead. Non-UTF-8 captions are *skipped*, not repaired: replacement
characters would teach the model garbage. Very long captions are cut to ``max_chars`` characters at a
word boundary (counted as the note ``caption_truncated``); token truncation happens in the collator.
Images: EXIF orientation applied; CMYK/YCbCr/LAB/1/L -> RGB; RGBA, LA, PA and palette or RGB/L images
with a transparency key composited on white; 16-bit and 32-bit integer (I;16*, I) and float (F)
images scaled to 8 bits.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qvlm.model_sources import UnreadableFile

DEFAULT_MAX_PIXELS = 64_000_000  # matches DataConfig.max_image_pixels
DEFAULT_MAX_CHARS = 2048  # caption character budget (tokens are cut later, in the collator)
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA / ShareGPT "from"
IMAGE_MARK = "<image>"  # where a conversation's image goes (LLaVA's marker)


class SkipRecord(Exception):
    """A record that cannot be used; ``reason`` is one short snake_case word for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipCounter:
    """How many records were seen, used and skipped (by reason), plus notes (e.g. caption_truncated)."""

    records: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def use(self, n: int = 1) -> None:
        self.records += n
        self.used += n

    def skip(self, reason: str, n: int = 1) -> None:
        self.records += n
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def note(self, name: str, n: int = 1) -> None:
        self.notes[name] = self.notes.get(name, 0) + n

    def to_dict(self) -> dict:
        return {"records": self.records, "used": self.used, "skipped": dict(sorted(self.skipped.items())),
                "notes": dict(sorted(self.notes.items()))}

    def summary(self) -> str:
        """One line, e.g. ``records 120, used 117, skipped 3 (truncated 2, not_an_image 1)``."""
        n_skip = sum(self.skipped.values())
        line = f"records {self.records}, used {self.used}, skipped {n_skip}"
        if self.skipped:
            line += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.notes:
            line += "; notes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items()))
        return line


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def read_bytes(source: bytes | str | Path) -> bytes:
    """The raw bytes of an image given as bytes or a path; ``missing_file`` / ``empty_file``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise SkipRecord("missing_file", str(path)) from exc
        except OSError as exc:
            raise SkipRecord("missing_file", f"{path}: {exc}") from exc
    if not data:
        raise SkipRecord("empty_file")
    return data


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
                 counter: SkipCounter | None = None) -> Image.Image:
    """Bytes or a path -> a fully loaded RGB image, or ``SkipRecord``. Never lets PIL errors escape."""
    data = read_bytes(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning: we enforce our own limit
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise SkipRecord("too_many_pixels", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise SkipRecord("not_an_image") from exc
        except Exception as exc:  # noqa: BLE001 - any decoder error is a bad record
            raise SkipRecord(classify(exc, "not_an_image"), repr(exc)) from exc
        w, h = img.size
        if w * h > max_pixels:
            raise SkipRecord("too_many_pixels", f"{w}x{h} > {max_pixels}")
        try:
            img.load()
            img = apply_orientation(img, counter)
            rgb = to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise SkipRecord("too_many_pixels", str(exc)) from exc
        except Exception as exc:  # noqa: BLE001
            raise SkipRecord(classify(exc, "corrupt"), repr(exc)) from exc
    if min(rgb.size) < min_side:
        raise SkipRecord("too_small", f"{rgb.size[0]}x{rgb.size[1]} < {min_side}")
    return rgb


SKIP_WORDS = {  # the image skip reasons, as a person should read them
    "missing_file": "the file does not exist or cannot be read",
    "empty_file": "the image is empty",
    "not_an_image": "the data is not an image PIL can read",
    "truncated": "the image is truncated",
    "corrupt": "the image is corrupt",
    "too_many_pixels": "the image has too many pixels",
    "too_small": "the image is too small",
}


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An input image named by the user (``qvlm caption``, ``chat``): ``decode_image``, or
    ``UnreadableFile`` naming the file and saying in words what is wrong."""
    try:
        return decode_image(Path(path), max_pixels=max_pixels)
    except SkipRecord as exc:
        detail = f" ({exc.detail})" if exc.reason == "too_many_pixels" and exc.detail else ""
        raise UnreadableFile(f"{path}: {SKIP_WORDS.get(exc.reason, exc.reason)}{detail}") from exc


def classify(exc: Exception, default: str) -> str:
    if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
        return "truncated"
    return default


def apply_orientation(img: Image.Image, counter: SkipCounter | None) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; a broken EXIF block leaves the image as it is."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is not a reason to drop the picture
        return img
    if orientation in (None, 1):
        return img
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img
    if counter is not None:
        counter.note("exif_rotated")
    return out if out is not None else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, high bit depths scaled to 8 bits."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(scale_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (I;16*) -> /257; 32-bit int (I) -> /257 when values exceed 255; float (F) in [0,1] -> *255."""
    arr = arr.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0
    elif mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def clean_caption(raw: object, max_chars: int = DEFAULT_MAX_CHARS, counter: SkipCounter | None = None) -> str:
    """A caption from str/bytes/None: strict UTF-8, whitespace collapsed, cut to ``max_chars``."""
    if raw is None:
        raise SkipRecord("bad_caption_empty", "missing")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SkipRecord("bad_caption_encoding", str(exc)) from exc
    if not isinstance(raw, str):
        raise SkipRecord("bad_caption_empty", f"not text: {type(raw).__name__}")
    try:
        raw.encode("utf-8")  # lone surrogates (from surrogateescape-decoded files) fail here
    except UnicodeEncodeError as exc:
        raise SkipRecord("bad_caption_encoding", str(exc)) from exc
    text = " ".join(raw.split())
    if not text:
        raise SkipRecord("bad_caption_empty", "blank")
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars // 2 else cut
        if counter is not None:
            counter.note("caption_truncated")
    return text


def to_messages(value):
    """``messages`` as is; LLaVA ``conversations`` ({"from", "value"}) -> {"role", "content"}."""
    if not isinstance(value, list):
        return value
    out = []
    for turn in value:
        if isinstance(turn, dict) and "from" in turn and "role" not in turn:
            turn = {"role": LLAVA_ROLES.get(turn["from"], turn["from"]), "content": turn.get("value")}
        out.append(turn)
    return out


def clean_messages(raw: object, max_chars: int = DEFAULT_MAX_CHARS,
                   counter: SkipCounter | None = None) -> list[dict]:
    """A chat as a list of {"role", "content"}; each content cleaned like a caption. Skipped: no
    assistant turn (``bad_messages``), roles out of order (an optional system turn, then user and
    assistant in turn, ending with the assistant: ``roles_out_of_order``), and more than one image
    mark (``several_images``)."""
    if not isinstance(raw, list) or not raw:
        raise SkipRecord("bad_messages", "not a non-empty list")
    out = []
    for turn in raw:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise SkipRecord("bad_messages", f"bad turn {str(turn)[:80]!r}")
        try:
            content = clean_caption(turn.get("content"), max_chars, counter)
        except SkipRecord as exc:
            reason = "bad_caption_encoding" if exc.reason == "bad_caption_encoding" else "bad_messages"
            raise SkipRecord(reason, exc.detail) from exc
        kind = turn.get("type")  # a question's type (VQA scores by it), kept when it is a short string
        out.append({"role": turn["role"], "content": content} | ({"type": kind} if isinstance(kind, str) and
                                                                  0 < len(kind) <= 32 else {}))
    if not any(t["role"] == "assistant" for t in out):
        raise SkipRecord("bad_messages", "no assistant turn")
    roles = [t["role"] for t in (out[1:] if out[0]["role"] == "system" else out)]
    if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
        raise SkipRecord("roles_out_of_order", " ".join(t["role"] for t in out)[:80])
    if sum(t["content"].count(IMAGE_MARK) for t in out) > 1:
        raise SkipRecord("several_images", f"more than one {IMAGE_MARK}")
    return out
