"""The demo vision tower's pretraining: hand-checked accuracy, save/load round-trip, atomic failure."""

from __future__ import annotations

import json

import pytest
import torch

from qvlm.data.synth import make_scene, render
from qvlm.models.vision import ImageProcessor, VisionEncoder
from qvlm.demo.vision_pretrain import (HEADS, IGNORE, BoundReadout, SpatialReadout, attribute_accuracy,
                                       build_tower, grey_split, lr_at_progress, normalise, position_prior, predict,
                                       readout_loss, render_pool, run_pretrain_vision, scene_targets)

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, max_steps=5,
            batch_size=8, n_train=32, n_eval=16, progress=False, seed=3)


def one_hot_logits(targets: torch.Tensor) -> torch.Tensor:
    """Logits (B, P, sum(HEADS)) whose argmax is exactly ``targets`` (B, P, 4)."""
    parts = []
    for i, (name, k) in enumerate(HEADS.items()):
        t = targets[..., i].clamp(min=0)  # IGNORE at empty positions: any class will do
        parts.append(torch.nn.functional.one_hot(t, k).float() * 10.0)
    return torch.cat(parts, dim=-1)


@pytest.fixture(scope="module")
def targets() -> torch.Tensor:
    return torch.tensor([scene_targets(make_scene(0, "test", i)) for i in range(8)])  # (8, P, 4)


def test_scene_targets_mark_empty_positions():
    scene = make_scene(0, "train", 0)
    rows = scene_targets(scene)
    for row, attrs in zip(rows, scene.attributes().values()):
        assert (row[0] == 1) == (attrs is not None)
        if attrs is None:
            assert row[1:] == [IGNORE] * 3


def test_accuracy_is_one_on_perfect_predictions(targets):
    acc = attribute_accuracy(predict(one_hot_logits(targets)), targets)
    assert acc == {"attr_acc": 1.0, "object_acc": 1.0, "presence_acc": 1.0, "color_acc": 1.0, "shape_acc": 1.0,
                   "size_acc": 1.0}


def test_accuracy_counts_each_wrong_attribute_once(targets):
    B, P = targets.shape[:2]
    present = (targets[..., 0] == 1).nonzero()
    b, p = present[0].tolist()
    wrong = targets.clone()
    wrong[b, p, 1] = (wrong[b, p, 1] + 1) % HEADS["color"]  # one wrong colour
    acc = attribute_accuracy(predict(one_hot_logits(wrong)), targets)
    assert acc["attr_acc"] == pytest.approx(1 - 1 / (B * P * 3))
    assert acc["object_acc"] == pytest.approx(1 - 1 / (len(present) * 3))
    assert acc["presence_acc"] == 1.0


def test_accuracy_missed_object_and_false_object(targets):
    B, P = targets.shape[:2]
    b, p = (targets[..., 0] == 1).nonzero()[0].tolist()
    e, q = (targets[..., 0] == 0).nonzero()[0].tolist()
    wrong = targets.clone()
    wrong[b, p, 0] = 0  # an object predicted absent: its 3 attributes are wrong
    wrong[e, q] = torch.tensor([1, 0, 0, 0])  # an empty position predicted occupied: 3 wrong
    acc = attribute_accuracy(predict(one_hot_logits(wrong)), targets)
    assert acc["attr_acc"] == pytest.approx(1 - 6 / (B * P * 3))
    assert acc["presence_acc"] == pytest.approx(1 - 2 / (B * P))


def test_loss_ignores_attributes_of_empty_positions(targets):
    logits = one_hot_logits(targets)
    noisy = logits.clone()
    empty = targets[..., 0] == 0
    noisy[..., 2:][empty] = torch.randn_like(noisy[..., 2:][empty]) * 5  # scramble colour/shape/size logits
    a, b = readout_loss(logits, targets), readout_loss(noisy, targets)
    assert set(a) == {*HEADS, "loss"}
    for name in a:
        assert a[name].item() == pytest.approx(b[name].item())


def test_pool_pixels_match_the_image_processor():
    processor = ImageProcessor(size=32)
    pixels, targets = render_pool(0, "train", 5, 3, processor)
    images = [render(make_scene(0, "train", i), 32) for i in range(5, 8)]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 32, 32) and targets.shape == (3, 5, 4)
    assert torch.equal(normalise(pixels, processor), processor(images))


def test_lr_at_progress():
    assert lr_at_progress(0.0, 1.0) == pytest.approx(0.01)
    assert lr_at_progress(0.025, 1.0) == pytest.approx(0.5)
    assert lr_at_progress(0.05, 1.0) == pytest.approx(1.0)
    assert lr_at_progress(0.525, 1.0) == pytest.approx(0.525)  # half-way down the cosine
    assert lr_at_progress(1.0, 1.0) == pytest.approx(0.05)
    assert lr_at_progress(2.0, 1.0) == pytest.approx(0.05)


def test_tiny_run_saves_a_loadable_tower(tmp_path):
    from transformers import AutoModel

    out = tmp_path / "tower"
    metrics = run_pretrain_vision(out, **TINY)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["readout"] == "spatial"
    assert {"attr_acc", "heldout_attr_acc", "steps", "train_s", "params"} <= set(saved)
    assert saved["steps"] == 5 and 0.0 <= saved["attr_acc"] <= 1.0
    assert metrics["attr_acc"] == saved["attr_acc"]
    assert (out / "readout.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tower"]  # no temporary folder left behind

    encoder = VisionEncoder.from_source(str(out))
    assert encoder.fingerprint() == VisionEncoder.from_source(str(out)).fingerprint()  # nothing drawn at load
    assert encoder.processor == ImageProcessor(size=32)
    image = render(make_scene(0, "test", 0), 32)
    feats = encoder(encoder.processor([image, image]))
    assert feats.shape == (2, (32 // 8) ** 2 + 1, 32)  # (B, N, Dv): patches + [CLS]

    init = build_tower(32, 8, 32, 1, 4, seed=TINY["seed"]).state_dict()
    loaded = AutoModel.from_pretrained(out).state_dict()
    assert init.keys() == loaded.keys()
    assert any(not torch.equal(init[k], loaded[k]) for k in init)


def test_position_prior_peaks_at_each_position_and_skips_cls():
    """8x8 patches of a 64 px image: 'left' (0.2, 0.5) is nearest patch centres in column 1, rows 3-4;
    'center' (0.5, 0.5) sits on the corner of patches (3,3), (3,4), (4,3), (4,4)."""
    prior = position_prior(65, sigma=0.1)  # (P, N): [CLS] + 64 patches
    assert prior.shape == (5, 65) and (prior[:, 0] < -1e3).all()
    weights = prior.softmax(dim=-1)
    assert weights[:, 0].max() < 1e-30
    grid = weights[:, 1:].view(5, 8, 8)
    left, center = grid[0], grid[4]
    assert {divmod(int(i), 8) for i in left.flatten().topk(2).indices} == {(3, 1), (4, 1)}
    assert {divmod(int(i), 8) for i in center.flatten().topk(4).indices} == {(3, 3), (3, 4), (4, 3), (4, 4)}
    assert torch.allclose(center[3, 3], center[4, 4])
    with pytest.raises(ValueError, match="square grid"):
        position_prior(64, sigma=0.1)


def test_spatial_readout_pools_one_shared_token_code_per_position():
    """Each position's logits are its pooling weights' average of the per-token head outputs."""
    readout = SpatialReadout(num_tokens=17, width=8)
    tokens = torch.randn(2, 17, 8)
    out = readout(tokens)
    assert out.shape == (2, 5, sum(HEADS.values()))
    per_token = readout.head(tokens)  # (2, 17, H)
    weights = readout.where.softmax(dim=-1)
    for p in range(5):
        assert torch.allclose(out[:, p], (weights[p][None, :, None] * per_token).sum(dim=1), atol=1e-6)


def test_tiny_run_with_the_flat_readout(tmp_path):
    """The default (the tiny run above) is the spatial readout; the flat one still trains and saves."""
    metrics = run_pretrain_vision(tmp_path / "tower", **TINY, readout="flat")
    assert metrics["steps"] == 5 and metrics["settings"]["readout"] == "flat"
    assert (tmp_path / "tower" / "readout.safetensors").is_file()
    with pytest.raises(ValueError, match="readout must be one of flat, spatial, bound"):
        run_pretrain_vision(tmp_path / "other", **TINY, readout="pooled")
    assert not (tmp_path / "other").exists()


def test_failing_run_raises_and_writes_nothing(tmp_path):
    out = tmp_path / "tower"
    with pytest.raises(ValueError, match="patch_size 7 must divide image_size 32"):
        run_pretrain_vision(out, **{**TINY, "patch_size": 7})
    with pytest.raises(ValueError, match="num_heads 3 must divide hidden_size 32"):
        run_pretrain_vision(out, **{**TINY, "num_heads": 3})
    assert list(tmp_path.iterdir()) == []


def test_the_tower_depends_on_steps_not_on_time(tmp_path):
    """Two runs with the same steps train the same tower, whatever the clock did meanwhile."""
    import time

    a = run_pretrain_vision(tmp_path / "a", **TINY)
    time.sleep(0.5)
    b = run_pretrain_vision(tmp_path / "b", **TINY)
    assert a["steps"] == b["steps"] == TINY["max_steps"]
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not a["bf16"]


def test_bound_readout_adds_a_scene_head_on_the_token_mean(tmp_path):
    """The bound readout predicts like the spatial one and adds a head on the mean token, trained
    with the same targets (its loss is logged as ``scene``)."""
    readout = BoundReadout(num_tokens=17, width=8)
    tokens = torch.randn(2, 17, 8)
    spatial = SpatialReadout(num_tokens=17, width=8)
    spatial.load_state_dict({k: v for k, v in readout.state_dict().items() if not k.startswith("scene.")})
    assert torch.equal(readout(tokens), spatial(tokens))
    scene = readout.extra_logits(tokens)
    assert scene.shape == (2, 5, sum(HEADS.values()))
    assert torch.allclose(scene.flatten(1), readout.scene(tokens.mean(dim=1)), atol=1e-6)
    assert torch.allclose(readout.extra_logits(tokens[:, torch.randperm(17)]), scene, atol=1e-5)  # any order
    metrics = run_pretrain_vision(tmp_path / "tower", **TINY, readout="bound")
    assert metrics["steps"] == 5 and metrics["settings"]["readout"] == "bound"
    assert 0.0 <= metrics["scene_object_acc"] <= 1.0  # the scene head is scored



def test_per_attribute_accuracy_over_occupied_positions(targets):
    wrong = targets.clone()
    occupied = (targets[..., 0] == 1).nonzero()
    b, p = occupied[0].tolist()
    wrong[b, p, 2] = (targets[b, p, 2] + 1) % HEADS["shape"]  # one wrong shape
    acc = attribute_accuracy(predict(one_hot_logits(wrong)), targets)
    assert acc["shape_acc"] == pytest.approx(1 - 1 / len(occupied))
    assert acc["color_acc"] == acc["size_acc"] == 1.0


def test_grey_split_learns_shape_from_grey_images_only(targets):
    processor = ImageProcessor(size=32)
    pixels, tg = render_pool(0, "test", 0, 4, processor)
    values = normalise(pixels, processor)
    grey = torch.tensor([True, False, True, False])
    before = values.clone(), tg.clone()
    out, out_tg, scene_tg = grey_split(values, tg, grey, processor)
    assert torch.equal(values, before[0]) and torch.equal(tg, before[1])  # inputs untouched
    assert torch.equal(out[~grey], values[~grey])  # colour images as they were
    assert torch.allclose(out[grey][:, 0], out[grey][:, 1]) and torch.allclose(out[grey][:, 0], out[grey][:, 2])
    assert not torch.allclose(out[grey], values[grey])
    assert (out_tg[grey][..., 1] == IGNORE).all() and torch.equal(out_tg[grey][..., 2], tg[grey][..., 2])
    assert (out_tg[~grey][..., 2] == IGNORE).all() and torch.equal(out_tg[~grey][..., 1], tg[~grey][..., 1])
    assert torch.equal(out_tg[..., [0, 3]], tg[..., [0, 3]])  # presence and size everywhere
    assert torch.equal(scene_tg[~grey], tg[~grey]) and torch.equal(scene_tg[grey], out_tg[grey])  # scene head


def test_grey_view_run_is_saved_with_its_setting(tmp_path):
    metrics = run_pretrain_vision(tmp_path / "v", grey_view=True, **TINY)
    saved = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert saved["settings"]["grey_view"] is True and 0.0 <= metrics["heldout_shape_acc"] <= 1.0
    encoder = VisionEncoder.from_source(str(tmp_path / "v"), grey_view=True)
    assert encoder.width == 2 * VisionEncoder.from_source(str(tmp_path / "v")).width


def test_grey_view_scene_head_keeps_shape_on_colour_images(monkeypatch, targets):
    """With the grey view the token head learns shape from grey images only, but the bound readout's
    scene head still gets every attribute of a colour image (only colour is dropped on grey ones)."""
    import qvlm.demo.vision_pretrain as V

    seen = []
    real = V.readout_loss
    monkeypatch.setattr(V, "readout_loss", lambda logits, t: seen.append(t.clone()) or real(logits, t))
    processor = ImageProcessor(size=32)
    pixels, tg = render_pool(0, "test", 0, 4, processor)
    tower = build_tower(32, 8, 32, 1, 4, seed=0)
    readout = BoundReadout(17, 32)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(readout.parameters()))
    grey = torch.tensor([True, False, True, False])
    V.train_step(tower, readout, opt, pixels, tg, processor, autocast=False, grey=grey)
    token_targets, scene_targets = seen
    assert (token_targets[~grey][..., 2] == IGNORE).all()  # per-token head: no shape on colour images
    assert torch.equal(scene_targets[~grey], tg[~grey])  # scene head: all of a colour image's labels
    assert (scene_targets[grey][..., 1] == IGNORE).all() and torch.equal(scene_targets[grey][..., 2], tg[grey][..., 2])
