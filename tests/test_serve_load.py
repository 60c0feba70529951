"""A bounded loopback load test: 200 requests at concurrency 16, a quarter of them malformed.

No 5xx, no crash, every valid request answered (some streamed); prints p50/p95 latency."""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from qvlm.serve.app import create_app  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402
from qvlm.serve.engine import Engine  # noqa: E402
from qvlm.serve.schemas import Limits  # noqa: E402
from serve_helpers import API_KEY, bomb_png, chat_body, data_url, png, truncated_png  # noqa: E402

N_REQUESTS, CONCURRENCY = 200, 16


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def request_plan() -> list[dict]:
    """Every 4th request malformed (cycling through the kinds); valid ones vary image, prompt and mode."""
    bomb, truncated = data_url(bomb_png(3000)), data_url(truncated_png())
    malformed = [
        dict(raw=b'{"messages": [}'),
        dict(body={"model": "tiny-vlm"}),
        dict(body=chat_body(truncated)),
        dict(body=chat_body(bomb)),
        dict(body=chat_body(data_url(b"GIF89a but not really"))),
        dict(body=chat_body(text="many words " * 300)),
        dict(body=chat_body(max_tokens=100_000)),
        dict(body=chat_body(), key="wrong"),
    ]
    images = [png((40 * k % 256, 255 - 30 * k % 256, 90)) for k in range(8)]
    plan = []
    for i in range(N_REQUESTS):
        if i % 4 == 3:
            plan.append({"valid": False, **malformed[(i // 4) % len(malformed)]})
        else:
            body = chat_body(images[i % len(images)], f"Question {i}: what do you see?", max_tokens=4 + i % 5)
            if i % 3 == 1:
                body["temperature"] = 0.8
            plan.append({"valid": True, "body": body, "stream": i % 5 == 0})
    return plan


def call(base: str, spec: dict, clients: threading.local) -> dict:
    client = getattr(clients, "client", None) or httpx.Client(timeout=60)
    clients.client = client
    headers = {"Authorization": f"Bearer {spec.get('key', API_KEY)}", "Content-Type": "application/json"}
    body = spec.get("body")
    content = spec.get("raw") or json.dumps({**body, "stream": True} if spec.get("stream") else body).encode()
    start = time.perf_counter()
    try:
        if spec.get("stream"):
            with client.stream("POST", base + "/v1/chat/completions", content=content, headers=headers) as resp:
                lines = [line for line in resp.iter_lines() if line.startswith("data:")]
            text = "".join(json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
                           for line in lines[:-1] if json.loads(line[5:]).get("choices"))
            ok = resp.status_code == 200 and lines[-1] == "data: [DONE]" and bool(text)
        else:
            resp = client.post(base + "/v1/chat/completions", content=content, headers=headers)
            payload = resp.json()
            ok = (bool(payload["choices"][0]["message"]["content"]) if resp.status_code == 200
                  else set(payload.get("error", {})) == {"message", "type", "param", "code"})
        return {"valid": spec["valid"], "status": resp.status_code, "ok": ok, "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - a transport failure is a test failure, reported below
        return {"valid": spec["valid"], "status": None, "ok": False, "error": repr(exc),
                "seconds": time.perf_counter() - start}


def test_load_200_requests_at_concurrency_16(serve_model_dir, capsys):
    from qvlm.models.vlm import VLM

    limits = Limits(max_body_bytes=1_000_000, max_image_bytes=200_000, max_image_pixels=1_000_000,
                    max_prompt_tokens=200, max_tokens=16, max_batch_size=8, max_queue=64)
    engine = Engine(VLM.from_pretrained(serve_model_dir, with_llm=True), "tiny-vlm", limits)
    app = create_app(engine, api_key=API_KEY)
    plan = request_plan()
    clients = threading.local()
    with serve_in_thread(app) as base:
        start = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda spec: call(base, spec, clients), plan))
        wall = time.perf_counter() - start
        health = httpx.get(base + "/health").json()
    valid = [r for r in results if r["valid"]]
    bad = [r for r in results if not r["valid"]]
    assert [r for r in results if r["status"] is None] == []  # no crash, no dropped connection
    assert [r for r in results if r["status"] >= 500] == []
    assert all(r["status"] == 200 and r["ok"] for r in valid), [r for r in valid if not r["ok"]][:3]
    assert all(400 <= r["status"] < 500 and r["ok"] for r in bad), [r for r in bad if not r["ok"]][:3]
    q = health["queue"]
    assert q["completed"] == len(valid) and q["failed"] == 0 and health["in_flight"] == 0

    lat = sorted(r["seconds"] for r in valid)
    line = (f"serve load: {len(results)} requests ({len(valid)} valid, {len(bad)} malformed), concurrency "
            f"{CONCURRENCY}, {wall:.1f} s, {len(results) / wall:.1f} req/s; valid latency p50 "
            f"{percentile(lat, 50) * 1000:.0f} ms, p95 {percentile(lat, 95) * 1000:.0f} ms; "
            f"{q['batches']} batches, largest {q['largest_batch']}")
    print(line)
    with capsys.disabled():
        print("\n" + line)
