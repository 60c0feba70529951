"""The OpenAI chat-completions wire format: request parsing with limits, error and response shapes.

Requests are parsed by hand from the JSON body (not pydantic models) so that every problem becomes
one ``APIError`` with OpenAI's error shape, the offending ``param`` and a 4xx status:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

What the model reads: the whole conversation, replayed through the chat template (system and
developer turns joined into one system turn first, then every user and assistant turn), and
exactly one image from the ``image_url`` parts of the user turns, placed in the turn that carries
it. A last user turn with an image and no text asks the model's default user prompt (a caption).
Reference: https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant")


@dataclass
class Limits:
    """What one request may ask for; everything over a limit is a 4xx, never a 5xx."""

    max_body_bytes: int = 16 * 1024 * 1024  # the whole request body (a base64 image is 4/3 of its bytes)
    max_image_bytes: int = 10 * 1024 * 1024  # one decoded image file
    max_image_pixels: int = 4096 * 4096  # width x height, read from the header before decoding
    max_prompt_tokens: int = 1024  # the rendered prompt, chat template and image slots included
    max_tokens: int = 512  # the largest max_tokens a request may ask for (and the default)
    max_batch_size: int = 8  # requests generated together
    max_queue: int = 64  # requests waiting beyond the running batch; more get 429
    allowed_image_hosts: tuple[str, ...] = ()  # "host" or "host:port" for http(s) image URLs; empty = none

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_tokens",
                     "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """What the server needs from one chat-completions request (validated, limits applied)."""

    image_url: str
    messages: list[dict]  # user and assistant turns ({"role", "content"}); IMAGE_SLOT marks the image
    system: str | None  # None: the model's default system prompt
    max_tokens: int | None  # None: as many as the limits and the context allow
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


# ---- field checks ----------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _optional_int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    x = body.get(name)
    if x is None:
        return None
    if not _is_int(x):
        raise bad(f"'{name}' must be an integer, got {type(x).__name__}", param=name)
    if x < lo or (hi is not None and x > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise bad(f"'{name}' must be {limit}, got {x}", param=name)
    return x


def _optional_number(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if not _is_number(x):
        raise bad(f"'{name}' must be a number, got {type(x).__name__}", param=name)
    if x < lo or x > hi or (lo_open and x == lo):
        raise bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}", param=name)
    return float(x)


def _optional_bool(body: dict, name: str) -> bool:
    x = body.get(name, False)
    if x is None:
        return False
    if not isinstance(x, bool):
        raise bad(f"'{name}' must be a boolean", param=name)
    return x


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
    return stops


# ---- messages --------------------------------------------------------------------------------

def _parts(content: Any, where: str) -> list[dict]:
    """A message's content as a list of parts: a string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or a list of content parts", param=f"{where}.content")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"'{where}.content[{j}]' must be an object with a 'type'", param=f"{where}.content[{j}]")
    return content


def _image_url(part: dict, where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad(f"'{where}.image_url.url' must be a non-empty string", param=f"{where}.image_url")
    return url


IMAGE_SLOT = "\x00image\x00"  # where the image goes in the parsed turns (the engine puts the placeholder)


def parse_messages(messages: Any) -> tuple[str, list[dict], str | None]:
    """(the one image URL, the user and assistant turns, the system text or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of chat messages", param="messages")
    images: list[str] = []
    systems: list[str] = []
    turns: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        if role == "assistant" and msg.get("content") is None:
            continue  # an assistant turn that only called tools: nothing to read
        texts = []
        for j, part in enumerate(_parts(msg.get("content"), where)):
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad(f"'{where}.content[{j}].text' must be a string", param=f"{where}.content[{j}].text")
                texts.append(part["text"])
            elif kind == "image_url" and role == "user":
                images.append(_image_url(part, f"{where}.content[{j}]"))
            elif kind == "image_url":
                raise bad(f"images are accepted in user messages only ({where} is {role})", param=where)
            else:
                raise bad(f"content part type {kind!r} is not supported (text and image_url are)",
                          param=f"{where}.content[{j}].type")
        text = "\n".join(t for t in texts if t.strip()).strip()
        if role in ("system", "developer") and text:
            systems.append(text)
        elif role in ("user", "assistant"):
            with_image = role == "user" and len(images) > sum(IMAGE_SLOT in t["content"] for t in turns)
            turns.append({"role": role, "content": f"{IMAGE_SLOT}{text}" if with_image else text})
    if not any(t["role"] == "user" for t in turns):
        raise bad("'messages' needs at least one user message", param="messages")
    if len(images) != 1:
        raise bad(f"this model answers about exactly one image per conversation; got {len(images)} image_url "
                  "parts (send the image as a data: URL in a user message)", param="messages", code="image_count")
    if turns[-1]["role"] != "user":
        raise bad("the last message must be a user message (the model answers it)", param="messages")
    return images[0], turns, "\n\n".join(systems) or None


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """A decoded JSON body -> ``ChatRequest`` or ``APIError`` (400)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if "messages" not in body:
        raise bad("'messages' is required", param="messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", param="model")
    image_url, turns, system = parse_messages(body["messages"])
    n = _optional_int(body, "n", 1)
    if n not in (None, 1):
        raise bad("only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional_int(body, name, 1)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(f"'{name}' is {max_tokens}; this server allows at most {limits.max_tokens}", param=name,
                  code="max_tokens_exceeded")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", param="stream_options")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad("'seed' must be an integer", param="seed")
    return ChatRequest(
        image_url=image_url, messages=turns, system=system, max_tokens=max_tokens,
        temperature=_optional_number(body, "temperature", 0.0, 2.0, default=0.0),
        top_p=_optional_number(body, "top_p", 0.0, 1.0, default=1.0, lo_open=True),
        stop=_stop(body), seed=seed, stream=_optional_bool(body, "stream"),
        include_usage=bool(options and _optional_bool(options, "include_usage")), model=model,
    )


# ---- responses -------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, created: int, delta: dict | None = None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """One ``chat.completion.chunk``; with ``usage_`` the final usage chunk (no choices)."""
    out: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_ is not None:
        out["choices"], out["usage"] = [], usage_
    else:
        out["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return out


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "qvlm"}
