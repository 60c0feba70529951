"""Runs saved before the CPU speed options were removed still work with today's code.

``tests/fixtures/old_run/`` was written by qvlm at commit 7e5207b (``tests/make_old_fixture.sh``):
a stage-1 model folder, the stage-2 model folder trained from it, and the same stage-2 run
interrupted after step 1 (a checkpoint, its config.yaml and metrics.jsonl). Their config.yaml files
hold the removed keys. Each test works on a temporary copy; the committed fixture is never written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_run"
REMOVED = ("model.qformer.image_pos_embed", "data.pad_to_multiple_of", "train.itc_one_pass",
           "train.itm_reuse_image_kv", "train.fused_qkv", "train.share_prompt_prefix")
# One removed key is enough for pytest.warns to pick the warning; test_removed_keys_are_named checks all.
REMOVED_MATCH = re.escape("train.fused_qkv")


def old_config(rel: str) -> dict:
    return yaml.safe_load((FIXTURE / rel / "config.yaml").read_text(encoding="utf-8"))


def test_fixture_is_an_old_run_holding_the_removed_keys():
    """Guards the fixture itself: if it lost the removed keys the other tests would prove nothing."""
    for rel in ("stage1/model", "stage2/model", "stage2_interrupted", "stage2_interrupted/checkpoints/step-1"):
        tree = old_config(rel)
        for dotted in REMOVED:
            node = tree
            for part in dotted.split("."):
                assert part in node, f"{rel}/config.yaml lacks {dotted}"
                node = node[part]
    from qvlm.config import REMOVED_KEYS

    assert set(REMOVED_KEYS) == set(REMOVED)


@pytest.fixture(scope="module")
def old_dirs(tmp_path_factory) -> Path:
    """A private copy of the fixture for this module's read-only uses."""
    root = tmp_path_factory.mktemp("old_run") / "old_run"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.fixture(scope="module")
def loaded(old_dirs):
    """The old stage-2 model folder loaded with today's code, and the warnings it raised."""
    from qvlm.models.vlm import VLM

    with pytest.warns(UserWarning, match=REMOVED_MATCH) as record:
        model = VLM.from_pretrained(old_dirs / "stage2" / "model").eval()
    return model, [str(w.message) for w in record]


@pytest.fixture(scope="module")
def image():
    from qvlm.data.synth import make_scene, render

    return render(make_scene(0, "test", 0), 32)


def test_removed_keys_are_named_in_the_warning(loaded):
    _, messages = loaded
    text = " ".join(messages)
    for dotted in REMOVED:
        assert dotted in text, (dotted, messages)


def test_old_model_loads_every_saved_tensor(loaded, old_dirs):
    """No saved tensor is dropped and no trainable tensor is left at its fresh init."""
    from safetensors.torch import load_file

    model, _ = loaded
    assert model.llm is not None  # a stage-2 folder loads with its LLM
    folder = old_dirs / "stage2" / "model"
    saved: dict = {}
    for file in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(file))
    assert {f.stem for f in folder.glob("*.safetensors")} == {"qformer", "heads", "projector", "lora"}
    state = model.trainable_state()
    assert set(state) == set(saved)
    for name, tensor in saved.items():
        assert state[name].dtype == tensor.dtype, name
        assert state[name].shape == tensor.shape, name
        assert bool((state[name].cpu() == tensor).all()), name


def test_old_model_captions_and_chats(loaded, image):
    from qvlm.inference import caption, chat
    from qvlm.models.generate import GenerationConfig

    model, _ = loaded
    gen = GenerationConfig(max_new_tokens=6)
    texts = caption(model, [image], gen=gen)
    assert isinstance(texts, list) and len(texts) == 1 and isinstance(texts[0], str)
    answer = chat(model, image, "What is this?", gen=gen)
    assert isinstance(answer, str)


def test_cli_eval_caption_on_old_model(old_dirs, capsys):
    from qvlm.cli import main

    with pytest.warns(UserWarning, match=REMOVED_MATCH):
        rc = main(["eval", "caption", "--model", str(old_dirs / "stage2" / "model"),
                   "--data", "synth:n=8,image_size=32", "--max-samples", "4", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert isinstance(result, dict) and result


def test_cli_caption_on_old_model(old_dirs, image, tmp_path, capsys):
    from qvlm.cli import main

    path = tmp_path / "scene.png"
    image.save(path)
    with pytest.warns(UserWarning, match=REMOVED_MATCH):
        rc = main(["caption", "--model", str(old_dirs / "stage2" / "model"), "--max-tokens", "6", str(path)])
    assert rc == 0, capsys.readouterr()


def test_serve_answers_from_old_model(old_dirs):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from serve_helpers import API_KEY, chat_body

    from qvlm.serve.app import create_app
    from qvlm.serve.engine import Engine
    from qvlm.serve.schemas import Limits

    limits = Limits(max_body_bytes=1_000_000, max_image_bytes=200_000, max_image_pixels=1_000_000,
                    max_prompt_tokens=200, max_tokens=32, max_batch_size=4, max_queue=8)
    with pytest.warns(UserWarning, match=REMOVED_MATCH):
        engine = Engine.load(old_dirs / "stage2" / "model", limits, model_id="old-vlm")
    with TestClient(create_app(engine, api_key=API_KEY)) as client:
        resp = client.post("/v1/chat/completions", json=chat_body(),
                           headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200, resp.text[:500]
    answer = resp.json()["choices"][0]["message"]["content"]
    assert isinstance(answer, str)


def test_train_init_from_old_stage1_model(old_dirs, tmp_path, capsys):
    """Stage 2 from an old stage-1 folder, with today's configs/tiny.yaml (the fixture's Q-Former is
    narrower than tiny.yaml's to keep it small, so its source is passed along)."""
    from qvlm.cli import main

    stage1 = old_dirs / "stage1" / "model"
    qformer = old_config("stage1/model")["model"]["qformer"]["source"]
    out = tmp_path / "run"
    rc = main(["train", str(CONFIGS / "tiny.yaml"), f"model.qformer.source={qformer}", "train.stage=2",
               "train.max_steps=1", f"train.init_from={stage1}", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert f"initialised Q-Former and heads from {stage1}" in err
    assert (out / "model" / "projector.safetensors").is_file()
    # the old stage-1 Q-Former is what stage 2 started from: the parts stage 2 never trains
    # (the Q-Former's word embeddings: stage 2 feeds it no text) are carried over unchanged
    from safetensors.torch import load_file

    before = load_file(stage1 / "qformer.safetensors")
    after = load_file(out / "model" / "qformer.safetensors")
    emb = [k for k in before if "word_embeddings" in k]
    assert emb and all(bool((before[k] == after[k]).all()) for k in emb)


def test_resume_an_old_interrupted_run(old_dirs, tmp_path, capsys):
    """``qvlm train RUN/config.yaml --out RUN --resume`` on a run the old code stopped after step 1.
    The run's config.yaml holds the removed keys (warned about) and train.init_from's absolute path
    from when the fixture was made, so init_from is pointed at the copy here."""
    from qvlm.cli import main

    run = tmp_path / "stage2_interrupted"
    shutil.copytree(FIXTURE / "stage2_interrupted", run)
    stage1 = old_dirs / "stage1" / "model"
    with pytest.warns(UserWarning, match=REMOVED_MATCH) as record:
        rc = main(["train", str(run / "config.yaml"), f"train.init_from={stage1}", "--out", str(run),
                   "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    text = " ".join(str(w.message) for w in record)
    assert all(dotted in text for dotted in REMOVED), text
    assert "resumed from" in err and "(step 1" in err, err[-2000:]
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert 1 in steps and 2 in steps and max(steps) == 2, steps
    assert steps.count(1) == 1 and steps.count(2) >= 1
    assert (run / "checkpoints" / "step-2" / "trainer.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert (run / "model" / "projector.safetensors").is_file()
    # the new run folder's config.yaml is today's: the removed keys are gone from it
    saved = (run / "config.yaml").read_text(encoding="utf-8")
    assert not any(dotted.rsplit(".", 1)[1] + ":" in saved for dotted in REMOVED), saved
