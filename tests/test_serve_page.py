"""The web page at / in headless Chromium (Debian's ``chromium``, driven by Playwright): give the API key,
drop an image, pick another, ask, and see the streamed answer; a screenshot is kept as an artifact
(pytest's tmp dir and test-artifacts/serve_page.png)."""

from __future__ import annotations

import base64
import io
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
import httpx  # noqa: E402

from conftest import ROOT  # noqa: E402
from qvlm.serve.app import create_app  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402
from qvlm.serve.engine import Engine  # noqa: E402
from qvlm.serve.schemas import Limits  # noqa: E402
from serve_helpers import API_KEY, chat_body  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
MODEL = "tiny-vlm"
PROMPT = "What is in the picture?"

DROP_JS = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: "image/png"}));
  const target = document.getElementById("drop");
  target.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
  target.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


def scene_png(index: int) -> bytes:
    from qvlm.data.synth import make_scene, render

    buf = io.BytesIO()
    render(make_scene(0, "test", index), size=256).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                              "`make test` installs it)")
def test_page_uploads_an_image_and_streams_the_answer(serve_model_dir, tmp_path):
    from qvlm.models.vlm import VLM

    engine = Engine(VLM.from_pretrained(serve_model_dir, with_llm=True), MODEL, Limits(max_tokens=64))
    picked = scene_png(3)
    with serve_in_thread(create_app(engine, api_key=API_KEY)) as base:
        expected = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                              json=chat_body(picked, PROMPT, max_tokens=16), timeout=30).json()
        expected = expected["choices"][0]["message"]["content"]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 900, "height": 1000})
                errors: list[str] = []  # script errors, and console errors other than the expected 401
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text)
                        if msg.type == "error" and "401" not in msg.text else None)
                expect = sync_api.expect
                page.goto(base + "/")
                expect(page.locator("#model")).to_contain_text("API key")  # /v1/models said 401
                page.click("summary")
                page.fill("#api-key", API_KEY)
                page.locator("#api-key").dispatch_event("change")
                expect(page.locator("#model")).to_have_text(MODEL)
                expect(page.locator("#send")).to_be_disabled()  # no image yet

                page.evaluate(DROP_JS, [base64.b64encode(scene_png(1)).decode(), "dropped.png"])
                expect(page.locator("#drop img")).to_have_attribute("alt", "dropped.png")
                page.set_input_files("#file", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": picked}])
                expect(page.locator("#drop img")).to_have_attribute("alt", "scene.png")

                page.fill("#prompt", PROMPT)
                page.fill("#max-tokens", "16")
                page.click("#send")
                expect(page.locator("#status")).to_contain_text("Done", timeout=30_000)
                answer = page.inner_text("#answer")
                shot = tmp_path / "serve_page.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "serve_page.png")
    assert answer.strip() and answer == expected  # the page shows what the API answers
    assert errors == []
