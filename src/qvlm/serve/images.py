"""``image_url`` -> RGB PIL image, with the server's limits, via the training data's robust decoder.

Accepted: ``data:image/...;base64,...`` URLs, and ``http(s)://`` URLs only for hosts on the
allow-list (``Limits.allowed_image_hosts``: "host" or "host:port"; redirects are not followed).
Never a local path or ``file:`` URL: the decoder gets bytes, not names. Bytes are capped before
decoding (``max_image_bytes``) and pixels are checked from the header before any pixel is decoded
(``max_image_pixels``, the decompression-bomb guard of ``qvlm.data.decode.decode_image``).
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from PIL import Image

from qvlm.data.decode import SKIP_WORDS, SkipRecord, decode_image
from qvlm.serve.schemas import APIError, Limits, bad

FETCH_TIMEOUT_S = 10.0


def image_bytes_from_url(url: str, limits: Limits) -> bytes:
    """The raw bytes behind a data: URL or an allow-listed http(s) URL; ``APIError`` otherwise."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url_bytes(url, limits.max_image_bytes)
    if scheme in ("http", "https"):
        return _fetch(url, limits)
    raise bad("image_url must be a data: URL (base64) or an http(s) URL on the server's allow-list; "
              "local files are never read", param="image_url", code="invalid_image_url")


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:"):
        raise bad("a data: URL must look like data:image/png;base64,<data>", param="image_url",
                  code="invalid_image_url")
    meta = header[5:].split(";")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise bad("data: URLs must be base64-encoded (data:image/png;base64,...)", param="image_url",
                  code="invalid_image_url")
    if meta[0] and not meta[0].lower().startswith("image/") and meta[0].lower() != "application/octet-stream":
        raise bad(f"the data: URL's media type is {meta[0]!r}, not an image", param="image_url", code="invalid_image")
    payload = "".join(payload.split())  # base64 may be wrapped
    if len(payload) // 4 * 3 > max_bytes + 3:  # checked before decoding the base64
        raise image_too_large(max_bytes)
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"the data: URL is not valid base64 ({exc})", param="image_url", code="invalid_image_url") from exc
    if len(data) > max_bytes:
        raise image_too_large(max_bytes)
    return data


def image_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the image is larger than this server's limit of {max_bytes} bytes", param="image_url",
                    code="image_too_large")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's hook
        raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed", headers, fp)


def host_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    return any(a.lower() in (host, f"{host}:{port}") for a in allowed) and bool(host)


def _fetch(url: str, limits: Limits) -> bytes:
    if not limits.allowed_image_hosts:
        raise bad("remote image URLs are disabled on this server; send the image as a data: URL",
                  param="image_url", code="remote_images_disabled")
    if not host_allowed(url, limits.allowed_image_hosts):
        raise bad(f"the host of {urlsplit(url).netloc!r} is not on this server's image allow-list", param="image_url",
                  code="image_host_not_allowed")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "qvlm-serve"}),
                         timeout=FETCH_TIMEOUT_S) as resp:
            data = resp.read(limits.max_image_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise bad(f"fetching the image failed: HTTP {exc.code} {exc.reason}", param="image_url",
                  code="image_fetch_failed") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad(f"fetching the image failed: {exc}", param="image_url", code="image_fetch_failed") from exc
    if len(data) > limits.max_image_bytes:
        raise image_too_large(limits.max_image_bytes)
    return data


def load_image(url: str, limits: Limits) -> Image.Image:
    """``image_url`` -> a fully decoded RGB image, or ``APIError`` (400 / 413)."""
    data = image_bytes_from_url(url, limits)
    try:
        return decode_image(data, max_pixels=limits.max_image_pixels)  # bytes only: never a path
    except SkipRecord as exc:
        reason = SKIP_WORDS.get(exc.reason, exc.reason)
        if exc.reason == "too_many_pixels":
            reason += f" (limit {limits.max_image_pixels} = width x height)"
        raise bad(f"the image could not be used: {reason}", param="image_url", code=f"image_{exc.reason}") from exc
