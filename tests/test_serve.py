"""qvlm serve: the OpenAI client against a live server on loopback, malformed requests over raw HTTP,
batching, the bounded queue, client disconnects, and the real CLI entry point."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from qvlm.serve.app import create_app  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402
from qvlm.serve.batcher import Batcher, Job, QueueFull  # noqa: E402
from qvlm.serve.engine import Engine, TextStream, Work, sampling_key  # noqa: E402
from qvlm.serve.schemas import Limits, parse_chat_request  # noqa: E402
from serve_helpers import (API_KEY, assert_openai_error, bomb_png, chat_body, data_url, header_bomb_png,  # noqa: E402
                           messages, png, post, truncated_png)

LIMITS = Limits(max_body_bytes=1_000_000, max_image_bytes=200_000, max_image_pixels=1_000_000,
                max_prompt_tokens=200, max_tokens=32, max_batch_size=4, max_queue=8)
MODEL = "tiny-vlm"


@pytest.fixture(scope="module")
def vlm(serve_model_dir):
    from qvlm.models.vlm import VLM

    return VLM.from_pretrained(serve_model_dir, with_llm=True).eval()


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server with /img.png and /moved (a redirect to it): "127.0.0.1:PORT"."""
    body = png((10, 200, 10))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's hook
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(vlm, image_host):
    engine = Engine(vlm, MODEL, replace(LIMITS, allowed_image_hosts=(image_host,)))
    with serve_in_thread(create_app(engine, api_key=API_KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def user_turn(text="What is in the picture?", image=None):
    return messages(png() if image is None else image, text)


# ---- the OpenAI client -----------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_openai_client_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=user_turn(), max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 4  # 4 image slots + the template
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, messages=user_turn("Describe it."), max_tokens=8)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_image_changes_the_answer_and_defaults_apply(client):
    red = client.chat.completions.create(model=MODEL, messages=user_turn(text=None), max_tokens=8)
    blue = client.chat.completions.create(model=MODEL, messages=user_turn(text=None, image=png((0, 0, 255))),
                                          max_tokens=8)
    assert red.choices[0].message.content != blue.choices[0].message.content
    system = [{"role": "system", "content": "Answer in one word."}] + user_turn()
    assert client.chat.completions.create(model=MODEL, messages=system, max_tokens=4).choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, messages=user_turn(), max_tokens=8, temperature=1.5, top_p=0.9)
    a = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    assert a == b


def test_stop_strings_cut_the_answer(client):
    kw = dict(model=MODEL, messages=user_turn(), max_tokens=12)
    free = client.chat.completions.create(**kw).choices[0].message.content
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = free[:free.find(stop)]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop,
                                                                                            stream=True))
    assert streamed == cut


def test_remote_image_only_from_allow_listed_hosts(server, image_host):
    ok = post(server, chat_body(f"http://{image_host}/img.png"))
    assert ok.status_code == 200, ok.text
    for url in (f"http://{image_host}/moved", "http://localhost:9/img.png", "https://example.com/a.png"):
        assert_openai_error(post(server, chat_body(url)), 400)


# ---- malformed input over raw HTTP -------------------------------------------------------------

MALFORMED = {
    "invalid_json": dict(raw=b'{"messages": [', status=400),
    "not_utf8": dict(raw=b'\xff\xfe{"a"', status=400),
    "empty_body": dict(raw=b"", status=400),
    "nan_temperature": dict(raw=b'{"messages": [], "temperature": NaN}', status=400),
    "body_not_an_object": dict(body=[1, 2], status=400),
    "missing_messages": dict(body={"model": MODEL, "max_tokens": 4}, status=400, param="messages"),
    "empty_messages": dict(body={"messages": []}, status=400, param="messages"),
    "bad_role": dict(body={"messages": [{"role": "robot", "content": "hi"}]}, status=400),
    "no_image": dict(body={"messages": [{"role": "user", "content": "hi"}]}, status=400),
    "two_images": dict(body={"messages": messages(png()) + messages(png())}, status=400),
    "audio_part": dict(body={"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, status=400),
    "not_an_image": dict(body=chat_body(data_url(b"this is plain text, not a picture")), status=400),
    "truncated_image": dict(body=chat_body(data_url(truncated_png())), status=400),
    "bad_base64": dict(body=chat_body("data:image/png;base64,%%%notbase64"), status=400),
    "not_base64_data_url": dict(body=chat_body("data:image/png,rawbytes"), status=400),
    "decompression_bomb": dict(body=chat_body(data_url(bomb_png())), status=400),
    "header_bomb": dict(body=chat_body(data_url(header_bomb_png())), status=400),
    "local_file": dict(body=chat_body("file:///etc/passwd"), status=400),
    "bare_path": dict(body=chat_body("/etc/passwd"), status=400),
    "image_too_many_bytes": dict(body=chat_body(data_url(b"\x89PNG" + b"\0" * 300_000)), status=413),
    "oversized_body": dict(raw=b'{"messages": "' + b"x" * 1_100_000 + b'"}', status=413),
    "too_many_prompt_tokens": dict(body=chat_body(text="word " * 400), status=400, param="messages"),
    "max_tokens_over_limit": dict(body=chat_body(max_tokens=10_000), status=400, param="max_tokens"),
    "max_tokens_zero": dict(body=chat_body(max_tokens=0), status=400, param="max_tokens"),
    "max_tokens_not_int": dict(body=chat_body(max_tokens="5"), status=400, param="max_tokens"),
    "temperature_out_of_range": dict(body=chat_body(temperature=3), status=400, param="temperature"),
    "top_p_zero": dict(body=chat_body(top_p=0, temperature=1), status=400, param="top_p"),
    "too_many_stops": dict(body=chat_body(stop=["a", "b", "c", "d", "e"]), status=400, param="stop"),
    "n_two": dict(body=chat_body(n=2), status=400, param="n"),
    "unknown_model": dict(body=chat_body(model="gpt-4o"), status=404, param="model"),
    "wrong_api_key": dict(body=chat_body(), key="wrong-key", status=401),
    "missing_api_key": dict(body=chat_body(), key=None, status=401),
    "unknown_route": dict(body=chat_body(), path="/v1/completions", status=404),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_openai_error(server, case):
    spec = dict(MALFORMED[case])
    status, param = spec.pop("status"), spec.pop("param", None)
    resp = post(server, spec.pop("body", None), key=spec.pop("key", API_KEY), path=spec.pop("path", None)
                or "/v1/chat/completions", raw=spec.pop("raw", None))
    err = assert_openai_error(resp, status)
    if param is not None:
        assert err["param"] == param, err


def test_wrong_key_on_every_api_route_and_wrong_method(server):
    for path in ("/v1/models", f"/v1/models/{MODEL}"):
        assert_openai_error(httpx.get(server + path, headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(httpx.get(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}),
                        405)


def test_declared_oversized_body_is_refused_before_it_arrives(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 1000000000\r\n\r\n".encode() + b"{")
        head, body = read_response(s)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """(status line + headers, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head, body


def test_server_keeps_serving_after_bad_requests(server, client):
    """Runs after the malformed cases (file order): the server still answers."""
    assert httpx.get(server + "/health").json()["queue"]["failed"] == 0
    r = client.chat.completions.create(model=MODEL, messages=user_turn(), max_tokens=3)
    assert r.choices[0].message.content


# ---- batching --------------------------------------------------------------------------------

def run_jobs(engine: Engine, bodies: list[dict]) -> list[list[tuple[str, dict]]]:
    """Prepare each body, run them as ONE batch, return each job's events."""
    loop = asyncio.new_event_loop()
    try:
        reqs = [parse_chat_request(b, engine.limits) for b in bodies]
        jobs = [Job(sampling_key(r), Work(r, engine.prepare(r)), loop) for r in reqs]
        engine.run_batch(jobs)
        loop.run_until_complete(asyncio.sleep(0.01))  # deliver the call_soon_threadsafe events
        out = []
        for job in jobs:
            events = []
            while not job.events.empty():
                events.append(job.events.get_nowait())
            out.append(events)
        return out
    finally:
        loop.close()


def answer(events: list[tuple[str, dict]]) -> tuple[str, dict]:
    """(the concatenated deltas, the "done" event's data)."""
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds[:-1]) <= {"delta"}, kinds
    return "".join(d["text"] for k, d in events if k == "delta"), events[-1][1]


def test_a_batch_answers_each_row_as_if_alone(vlm):
    engine = Engine(vlm, MODEL, LIMITS)
    bodies = [chat_body(png((200, 30, 30)), "What is this?", max_tokens=9),
              chat_body(png((0, 0, 255), size=(64, 64)), "Describe the colours of this picture, please.",
                        max_tokens=5),
              chat_body(png((250, 250, 0)), None, max_tokens=12)]
    alone = [answer(run_jobs(engine, [b])[0]) for b in bodies]
    together = [answer(events) for events in run_jobs(engine, bodies)]
    assert together == alone
    for (text, done), body in zip(together, bodies):
        assert text == done["text"] and text  # the streamed deltas add up to the answer
        assert done["completion_tokens"] <= body["max_tokens"]  # each row keeps its own budget
    assert len({t for t, _ in together}) == 3


def test_compiled_engine_warms_up_and_answers_as_the_eager_one(vlm):
    """--compile: the decoding step is compiled at start-up (warm_up), and a batch then gets the
    eager engine's answers."""
    bodies = [chat_body(png((200, 30, 30)), "What is this?", max_tokens=9),
              chat_body(png((0, 0, 255), size=(64, 64)), "Describe the colours of this picture, please.",
                        max_tokens=5)]
    eager = [answer(events) for events in run_jobs(Engine(vlm, MODEL, LIMITS), bodies)]
    engine = Engine(vlm, MODEL, LIMITS, compile=True)
    assert engine.warm_up() > 0 and vlm.llm._compiled  # compiled before the first request
    assert [answer(events) for events in run_jobs(engine, bodies)] == eager
    assert engine.generation_config(parse_chat_request(bodies[0], LIMITS), 4).compile


def test_stop_string_per_row_in_a_batch(vlm):
    engine = Engine(vlm, MODEL, LIMITS)
    base = chat_body(png(), "What is this?", max_tokens=12)
    free, _ = answer(run_jobs(engine, [base])[0])
    stop = free[3:5]
    (cut, done), (other, _) = [answer(e) for e in run_jobs(engine, [{**base, "stop": [stop]}, base])]
    assert cut == free[:free.find(stop)] and done["finish_reason"] == "stop"
    assert other == free


def test_text_stream_holds_back_partial_stops_and_characters():
    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stream = TextStream(decode, ["world"])
    assert stream.update([1]) == ("Hello", False)
    assert stream.update([1, 2]) == (" ", False)  # "wor" could start "world"
    assert stream.update([1, 2, 3]) == ("", True)
    assert stream.final([1, 2, 3]) == ("", "Hello ")
    stream = TextStream(decode, [])
    assert stream.update([1, 4]) == ("Hello", False)  # an incomplete character waits


def test_batcher_groups_compatible_jobs_in_arrival_order():
    seen: list[list[str]] = []
    release = threading.Event()

    def run(jobs):
        seen.append([j.payload for j in jobs])
        release.wait(5)
        for j in jobs:
            j.emit("done", finish_reason="stop")

    loop = asyncio.new_event_loop()
    batcher = Batcher(run, max_batch_size=2, max_queue=4)
    jobs = [Job(key, name, loop) for key, name in [("g", "a"), ("g", "b"), ("s", "c"), ("g", "d"), ("g", "e"),
                                                   ("s", "f")]]
    batcher.submit(jobs[0])
    batcher.start()
    while not seen:
        time.sleep(0.005)
    for job in jobs[1:5]:
        batcher.submit(job)
    with pytest.raises(QueueFull):  # 4 waiting already
        batcher.submit(jobs[5])
    batcher.cancel(jobs[3])  # "d" leaves the queue before it runs
    release.set()
    while batcher.snapshot()["completed"] < 4:
        time.sleep(0.005)
    batcher.stop()
    loop.close()
    assert seen == [["a"], ["b", "e"], ["c"]]
    stats = batcher.snapshot()
    assert stats["cancelled"] == 1 and stats["rejected"] == 1 and stats["largest_batch"] == 2


# ---- back-pressure and disconnects -------------------------------------------------------------

def slow_runner(steps: int = 40, delay: float = 0.01):
    """A stand-in for the model: one "x" per job every ``delay`` seconds, stopping cancelled jobs."""
    def run(jobs):
        for _ in range(steps):
            for j in jobs:
                if j.cancelled.is_set():
                    j.emit("done", finish_reason="cancelled")
                elif not j.done:
                    j.emit("delta", text="x")
            if all(j.done for j in jobs):
                return
            time.sleep(delay)
        for j in jobs:
            j.emit("done", finish_reason="length", text="x" * steps, prompt_tokens=1, completion_tokens=steps)
    return run


def wait_for(base: str, check, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(base + "/health").json()
        if check(health) or time.monotonic() > deadline:
            assert check(health), health
            return health
        time.sleep(0.02)


def first_data_line(lines, containing: str = "") -> str:
    """Read ``lines`` (ONE ``iter_lines()`` per response: dropping it closes the connection) to a match."""
    for line in lines:
        if line.startswith("data:") and containing in line:
            return line
    raise AssertionError("stream ended")


def test_full_queue_is_429_and_disconnects_free_their_slots(vlm):
    limits = replace(LIMITS, max_batch_size=1, max_queue=1)
    engine = Engine(vlm, MODEL, limits)
    app = create_app(engine, api_key=API_KEY, batcher=Batcher(slow_runner(steps=2000), 1, 1))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {**chat_body(), "stream": True}
    with serve_in_thread(app) as base, httpx.Client(timeout=30) as ca, httpx.Client(timeout=30) as cb:
        with ca.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as a:
            a_lines = a.iter_lines()
            first_data_line(a_lines, '"content":"x"')  # A is generating
            with cb.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as b:
                b_lines = b.iter_lines()
                first_data_line(b_lines)  # B is admitted and waits
                wait_for(base, lambda h: h["queue"]["waiting"] == 1)
                full = post(base, chat_body())
                assert_openai_error(full, 429)["code"] == "queue_full"
                assert full.headers["retry-after"] == "1"
            wait_for(base, lambda h: h["in_flight"] == 1 and h["queue"]["waiting"] == 0)  # B left the queue
        wait_for(base, lambda h: h["in_flight"] == 0 and h["queue"]["running"] == 0 and h["queue"]["cancelled"] == 2)

        # a non-streaming client that leaves mid-generation stops its job too
        host, port = base.removeprefix("http://").split(":")
        raw = json.dumps(chat_body()).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_for(base, lambda h: h["queue"]["running"] == 1)
        health = wait_for(base, lambda h: h["in_flight"] == 0 and h["queue"]["cancelled"] == 3)
        assert health["queue"]["completed"] == 0 and health["queue"]["failed"] == 0


# ---- the CLI ---------------------------------------------------------------------------------

def qvlm_command() -> list[str]:
    script = Path(sys.executable).with_name("qvlm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qvlm.cli"]


def test_cli_serve_runs_the_server(serve_model_dir, tmp_path):
    env = {**os.environ, "QVLM_API_KEY": "env-key", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(qvlm_command() + ["serve", "--model", str(serve_model_dir), "--port", "0",
                                              "--log-level", "warning", "--max-tokens", "8"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(" on http://" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        base = next(line for line in lines if " on http://" in line).split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")  # loopback by default
        for _ in range(200):  # the socket is bound before uvicorn starts accepting
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        assert_openai_error(post(base, chat_body(), key=None), 401)
        ok = post(base, chat_body(max_tokens=4), key="env-key")
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        assert_openai_error(post(base, chat_body(max_tokens=9), key="env-key"), 400)  # --max-tokens 8
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "<title>qvlm</title>" in page.text
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then the CLI's usual 130
        assert proc.wait(timeout=30) == 130
        reader.join(5)
        assert "interrupted" in lines[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_usage_errors(serve_model_dir, tmp_path):
    from qvlm.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2  # not a model folder
    (tmp_path / "config.yaml").write_text((serve_model_dir / "config.yaml").read_text())
    assert main(["serve", "--model", str(tmp_path)]) == 2  # a stage-1 folder: no projector
    assert main(["serve", "--model", str(serve_model_dir), "--port", "70000"]) == 2
    assert main(["serve", "--model", str(serve_model_dir), "--max-queue", "-1"]) == 2
    assert main(["serve", "--model", str(serve_model_dir), "--max-batch-size", "0"]) == 2
