"""The demo's report folder: loss curves as PNG (drawn with PIL), an HTML page of test images with
their generated captions, and metrics.json. No plotting library needed."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line after a crash
    return [r for r in rows if "loss" in r]


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str, size=(640, 360)) -> Path:
    """Line chart of ``keys`` against ``step`` (log-scaled y when the range is wide)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, w - 12, 28, h - 36
    draw.text((left, 8), title, fill="black")
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and r[k] > 0] for k in keys}
    series = {k: pts for k, pts in series.items() if pts}  # a term the run did not use gets no legend entry
    points = [p for s in series.values() for p in s]
    if not points:
        img.save(path)
        return path
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    ys = [p[1] for p in points]
    log = max(ys) / max(min(ys), 1e-9) > 20
    f = (lambda v: math.log10(v)) if log else (lambda v: v)  # noqa: E731
    y0, y1 = f(min(ys)), f(max(ys))
    sx = lambda x: left + (right - left) * (x - x0) / max(1, x1 - x0)  # noqa: E731
    sy = lambda y: bottom - (bottom - top) * (f(y) - y0) / max(1e-9, y1 - y0)  # noqa: E731
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        value = y0 + frac * (y1 - y0)
        label = f"{10 ** value:.3g}" if log else f"{value:.3g}"
        draw.text((4, bottom - frac * (bottom - top) - 6), label, fill="black")
    draw.text((left, bottom + 8), f"step {x0}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {x1}", fill="black")
    for i, (key, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) > 1:
            draw.line([(sx(x), sy(y)) for x, y in pts], fill=color, width=2)
        draw.text((right - 110, top + 6 + 14 * i), key, fill=color)
    img.save(path)
    return path


def image_data_url(img: Image.Image, scale: int = 2) -> str:
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(path: Path, title: str, metrics: dict, sections: list[tuple[str, list[dict]]],
               curves: list[str]) -> Path:
    """``sections``: (heading, [{"image": PIL, "caption": generated, "truth": reference}, ...])."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;width:180px;"
             "margin:6px;vertical-align:top;font-size:12px}pre{background:#f6f6f6;padding:1em}"
             ".ok{color:#1a7f37}.bad{color:#b42318}</style>",
             f"<h1>{html.escape(title)}</h1><h2>Metrics</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>",
             "<h2>Loss curves</h2>"]
    parts += [f"<img src='{html.escape(c)}' alt='{html.escape(c)}'>" for c in curves]
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for item in items:
            cls = "ok" if item.get("correct") else "bad"
            parts.append(f"<figure><img src='{image_data_url(item['image'])}' width='128'><figcaption>"
                         f"<b class='{cls}'>{html.escape(item['caption'])}</b><br>"
                         f"<i>truth:</i> {html.escape(item['truth'])}</figcaption></figure>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
