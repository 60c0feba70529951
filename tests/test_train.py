"""The training loop: schedule, exact resume, crash-safe checkpoints, NaN stop, the saved model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qvlm.cli import main
from qvlm.config import ConfigError, load_config, validate
from qvlm.models.vlm import VLM
from qvlm.train import checkpoint as ckpt
from qvlm.train.loop import NonFiniteLoss, train
from qvlm.train.optim import lr_at

from conftest import CONFIGS


def tiny(*overrides):
    return load_config(CONFIGS / "tiny.yaml", ["train.precision=fp32", *overrides])


def test_lr_at_values():
    assert lr_at(0, 1.0, warmup_steps=4, max_steps=104) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 104) == pytest.approx(1.0)
    assert lr_at(4, 1.0, 4, 104, min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(54, 1.0, 4, 104, min_lr_ratio=0.1) == pytest.approx(0.55)  # half-way: mid of [0.1, 1]
    assert lr_at(104, 1.0, 4, 104, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 4, 104, min_lr_ratio=0.0) == 0.0
    assert lr_at(0, 2.0, 0, 10) == pytest.approx(2.0)


def weights(run: Path) -> dict:
    state = {}
    for name in ("qformer", "heads"):
        state.update(load_file(run / "model" / f"{name}.safetensors"))
    return state


def test_resume_is_exact(tmp_path):
    cfg = tiny("train.max_steps=6", "train.save_every=3", "train.warmup_steps=2")
    train(cfg, tmp_path / "straight", progress=False)
    first = train(cfg, tmp_path / "resumed", progress=False, stop_at_step=3)
    assert first["stopped"] and (tmp_path / "resumed" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "resumed" / "model").exists()
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # rows past the checkpoint, torn by a crash
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # training seconds keep counting across the resume (evals and checkpoints left out)
    seconds = [r["train_s"] for r in rows if "loss" in r]
    assert all(b > a > 0 for a, b in zip(seconds, seconds[1:])), seconds
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the resumed run really trained: weights differ from a 3-step run
    train(tiny("train.max_steps=3", "train.warmup_steps=2"), tmp_path / "short", progress=False)
    c = weights(tmp_path / "short")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_is_exact_with_length_grouped_batches(tmp_path):
    cfg = tiny("train.max_steps=4", "train.save_every=2", "data.group_by_length=true")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at_step=2)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_model_round_trip(tmp_path):
    cfg = tiny("train.max_steps=2")
    train(cfg, tmp_path / "run", progress=False)
    model = VLM.from_pretrained(tmp_path / "run" / "model").eval()
    saved = weights(tmp_path / "run")
    state = model.trainable_state()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert model.projector is None  # a stage-1 model
    pixels = torch.randn(2, 3, 32, 32)
    again = VLM.from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        q1 = model.qformer(image_embeds=model.image_features(pixels)).query
        q2 = again.qformer(image_embeds=again.image_features(pixels)).query
    assert torch.equal(q1, q2)


def test_nan_loss_stops_with_clear_message(tmp_path, monkeypatch):
    import qvlm.train.loop as loop

    def nan_losses(*args, **kwargs):
        return {"loss": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(loop, "step_losses", nan_losses)
    with pytest.raises(NonFiniteLoss, match="lower train.lr"):
        train(tiny("train.max_steps=2"), tmp_path / "run", progress=False)


def test_step_logs_the_mean_of_its_micro_batches_and_the_gradient_norm(monkeypatch):
    """Each logged term is the mean over the micro-batches and the gradient norm is the one clipped
    (before clipping); they are read from the device together (no float() per term: on a GPU each
    would wait for the device)."""
    import qvlm.train.loop as loop

    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    calls = []

    def step(batch, gen):
        calls.append(len(calls))
        scale = float(len(calls))  # micro-batch k: loss k * sum(weight), extra term k
        return {"loss": scale * weight.sum(), "extra": torch.tensor(scale)}

    cfg = tiny("train.grad_accum=2", "train.clip_grad=100")
    stream = type("Stream", (), {"next_batch": lambda self, device: {}})()
    accelerator = type("Acc", (), {"no_sync": lambda self, module: loop.nullcontext()})()
    model = type("Model", (), {"heads": type("Heads", (), {"clamp_temperature": lambda self: None})()})()
    opt = torch.optim.SGD([weight], lr=0.0)
    reads = []
    real_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t) or real_float(t))
    values = loop.train_step(step, accelerator, model, opt, stream, cfg, loop.nullcontext(), None, [weight],
                             torch.device("cpu"))
    assert calls == [0, 1] and reads == []
    assert values["extra"] == pytest.approx(1.5) and values["loss"] == pytest.approx(1.5 * 7.0)
    assert values["grad_norm"] == pytest.approx(1.5 * 2 ** 0.5)  # d/dw of the mean loss: 1.5 per weight
    assert all(isinstance(v, float) for v in values.values())


def test_prune_keeps_last_and_best(tmp_path):
    cfg = tiny("train.max_steps=6", "train.save_every=1", "train.keep_last=2")
    train(cfg, tmp_path / "run", progress=False)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps == ["step-5", "step-6"]
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-6"


WRITER = r"""
import sys, torch
from pathlib import Path
from qvlm.config import load_config
from qvlm.train import checkpoint as ckpt
root = Path(sys.argv[1]); cfg = load_config(sys.argv[2])
p = torch.nn.Parameter(torch.zeros(2_000_000))
opt = torch.optim.AdamW([p])
p.grad = torch.ones_like(p); opt.step()
for step in range(1, 10_000):
    p.data.fill_(step)
    ckpt.save_checkpoint(root, step, {"p": p.data}, opt, cfg, {"data": {}})
    print(step, flush=True)
"""


def test_sigkill_during_checkpoint_write_leaves_a_readable_latest(tmp_path):
    root = tmp_path / "ckpts"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for delay in (0.0, 0.013, 0.031, 0.057, 0.11, 0.2):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(CONFIGS / "tiny.yaml")],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.readline()  # the first checkpoint of this writer is complete; now kill mid-write
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ckpt.latest_checkpoint(root)
        assert latest is not None
        p = torch.nn.Parameter(torch.zeros(2_000_000))
        opt = torch.optim.AdamW([p])
        tensors, trainer = ckpt.load_checkpoint(latest, opt)
        assert torch.all(tensors["p"] == trainer["step"])  # complete and self-consistent


def test_cli_train_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(out), "--no-progress",
                 "train.max_steps=2", "eval.max_samples=8"]) == 0
    for name in ("config.yaml", "metrics.jsonl", "model/config.yaml", "model/qformer.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("step-*"))
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(out / "model"), "--max-samples", "8", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r10", "itc_i2t_r1"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n"] == 8
    assert main(["eval", "classify", "--model", str(out / "model"), "--max-samples", "16", "--json",
                 "--classes", "circle,square,triangle", "--template", "a {}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n"] + metrics["unlabelled"] == 16
    assert main(["eval", "classify", "--model", str(out / "model")]) == 2  # --classes missing


def test_caption_label():
    from qvlm.eval.classify import caption_label

    classes = ["circle", "square", "triangle"]
    assert caption_label("a large red circle on the left", classes) == 0
    assert caption_label("a red circle and a blue square", classes) is None
    assert caption_label("circles everywhere", classes) is None


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["config", str(CONFIGS / "tiny.yaml"), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main(["train", str(CONFIGS / "tiny.yaml")]) == 2  # --out missing
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path), "--bogus"]) == 2
    assert main(["config", str(CONFIGS / "tiny.yaml"), "model.vision.source=./missing-dir"]) == 0  # resolved lazily
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "r"),
                 "model.vision.source=./missing-dir"]) == 2
    assert "missing-dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "r2"), "train.stage=2",
                 f"train.init_from={tmp_path / 'empty'}"]) == 1
    assert "train.init_from" in capsys.readouterr().err


def test_saved_model_bundles_local_base_models_and_can_move(tmp_path):
    import shutil

    from qvlm.models.vision import VisionEncoder

    tower = VisionEncoder.from_source(tiny().model.vision.source, seed=5)
    tower.tower.save_pretrained(tmp_path / "tower")
    cfg = tiny(f"model.vision.source={tmp_path / 'tower'}")
    model = VLM.from_config(cfg, with_llm=False)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "tower")  # the original is gone: the model folder must carry it
    shutil.move(tmp_path / "saved", tmp_path / "moved")
    again = VLM.from_pretrained(tmp_path / "moved")
    assert again.vision.fingerprint() == model.vision.fingerprint()
    assert "base/vision" in (tmp_path / "moved" / "config.yaml").read_text()


def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny("train.max_steps=3", "train.tensorboard=true", "eval.max_samples=0"), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    assert "train/itc" in events.Tags()["scalars"] and "train/lr" in events.Tags()["scalars"]


def test_itm_fraction_scores_the_first_pairs_and_their_negatives(tiny_cfg, monkeypatch):
    """train.itm_fraction=0.5 on a batch of 4: ITM sees positives 0-1 and the same two hard negatives
    each that the full batch draws for them, so its logits are rows 0,1 | 4,5 | 8,9 of the full pass."""
    import qvlm.models.stage1 as S1
    from qvlm.models.vlm import VLM
    from qvlm.train.steps import step_losses

    seen = []
    real = S1.L.itm_loss
    monkeypatch.setattr(S1.L, "itm_loss", lambda logits, labels: seen.append((logits, labels)) or real(logits, labels))
    tiny_cfg.model.qformer.dropout = 0.0
    model = VLM.from_config(tiny_cfg).train()
    g = torch.Generator().manual_seed(0)
    batch = {"image_embeds": torch.randn(4, 17, 32, generator=g), "input_ids": torch.randint(1000, 2000, (4, 9), generator=g),
             "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    full = step_losses(model, batch, tiny_cfg, generator=torch.Generator().manual_seed(1), dec_token_id=1)
    tiny_cfg.train.itm_fraction = 0.5
    half = step_losses(model, batch, tiny_cfg, generator=torch.Generator().manual_seed(1), dec_token_id=1)
    (full_logits, full_labels), (half_logits, half_labels) = seen
    rows = torch.tensor([0, 1, 4, 5, 8, 9])
    assert full_logits.shape == (12, 2) and half_logits.shape == (6, 2)
    assert torch.allclose(half_logits, full_logits[rows], atol=1e-5)
    assert half_labels.tolist() == [1, 1, 0, 0, 0, 0] and torch.equal(half_labels, full_labels[rows])
    assert torch.allclose(full["itc"], half["itc"]) and torch.allclose(full["itg"], half["itg"])
    tiny_cfg.train.itm_fraction = 0.0
    with pytest.raises(ConfigError, match="itm_fraction"):
        validate(tiny_cfg)


def test_return_model_gives_the_weights_just_saved(tmp_path):
    """``train(..., return_model=True)`` hands back the trained model; it holds exactly what
    ``OUT/model`` holds (the demo evaluates it without loading the base models again)."""
    result = train(tiny("train.max_steps=2", "eval.max_samples=0"), tmp_path / "run", progress=False,
                   return_model=True)
    saved = weights(tmp_path / "run")
    live = result["model"].trainable_state()
    assert set(saved) <= set(live) and all(torch.equal(saved[k], live[k]) for k in saved)
    assert "model" not in train(tiny("train.max_steps=1", "eval.max_samples=0"), tmp_path / "other", progress=False)
