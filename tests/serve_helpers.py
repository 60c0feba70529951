"""Helpers for the serving tests: a tiny saved model, images (good, broken, bombs), raw HTTP calls."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
from PIL import Image

from conftest import CONFIGS

API_KEY = "test-key"


def save_tiny_model(path: Path) -> Path:
    """The tiny random VLM with louder LoRA and projector weights, saved. At init scale greedy decoding
    repeats a newline (an empty answer once stripped); these weights give varied, image-dependent text."""
    import torch

    from qvlm.config import load_config
    from qvlm.models.vlm import VLM

    vlm = VLM.from_config(load_config(CONFIGS / "tiny.yaml"), with_llm=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in vlm.llm.lora_parameters():
            p.normal_(0, 1.0, generator=g)
        for p in vlm.projector.parameters():
            p.mul_(3)
    return vlm.save_pretrained(path)


# ---- images ----------------------------------------------------------------------------------

def png(color=(200, 30, 30), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((255 - color[0], 120, 255 - color[2]), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 4000) -> bytes:
    """A real decompression bomb: a side x side grey PNG of zeros, a few KiB on the wire."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def header_bomb_png(side: int = 100_000) -> bytes:
    """A PNG header claiming side x side pixels (PIL itself refuses it at open)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = png(size=(64, 64))
    return data[: len(data) // 2]


# ---- requests --------------------------------------------------------------------------------

def messages(image: bytes | str | None = None, text: str | None = "What is in the picture?") -> list[dict]:
    content: list[dict] = []
    if image is not None:
        url = image if isinstance(image, str) else data_url(image)
        content.append({"type": "image_url", "image_url": {"url": url}})
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def chat_body(image: bytes | str | None = None, text: str | None = "What is in the picture?", **kw) -> dict:
    return {"messages": messages(png() if image is None else image, text), "max_tokens": 6, **kw}


def post(base: str, body: object, key: str | None = API_KEY, path: str = "/v1/chat/completions",
         raw: bytes | None = None, timeout: float = 30.0) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(base + path, content=content, headers=headers, timeout=timeout)


def assert_openai_error(resp: httpx.Response, status: int | None = None) -> dict:
    """A 4xx (or ``status``) with OpenAI's error JSON; returns the error object."""
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if status is not None:
        assert resp.status_code == status, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` on a background thread for the ``with`` block; yields its base URL."""
    from qvlm.serve.app import bind, make_server

    sock = bind(host, port)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="qvlm-serve")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the server did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
