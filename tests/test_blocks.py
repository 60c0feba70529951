"""Shapes, freezing and composition of the blocks, from tiny random configs."""

import pytest
import torch
from PIL import Image

from qvlm.models.projector import Projector
from qvlm.models.vision import ImageProcessor, VisionEncoder, to_grey

TINY_VIT = "random:vit?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64&image_size=32&patch_size=8"


def test_image_processor_converts_modes_and_normalises():
    proc = ImageProcessor(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    imgs = [Image.new("L", (40, 10), 255), Image.new("RGBA", (5, 7), (0, 0, 0, 255))]
    pixels = proc(imgs)
    assert pixels.shape == (2, 3, 16, 16)
    assert torch.allclose(pixels[0], torch.ones_like(pixels[0]))  # white -> +1
    assert torch.allclose(pixels[1], -torch.ones_like(pixels[1]))  # black -> -1


def test_image_processor_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": true,'
        ' "image_mean": [0.48, 0.45, 0.40], "image_std": [0.26, 0.26, 0.27], "resample": 3}'
    )
    proc = ImageProcessor.from_pretrained_dir(tmp_path, fallback_size=32)
    assert proc.size == 224 and proc.crop and proc.mean == (0.48, 0.45, 0.40)
    assert proc([Image.new("RGB", (300, 224))]).shape == (1, 3, 224, 224)


def test_vision_encoder_shapes_frozen_and_eval_locked():
    enc = VisionEncoder.from_source(TINY_VIT)
    pixels = torch.randn(2, 3, 32, 32)
    feats = enc(pixels)
    assert feats.shape == (2, 1 + 16, 32)  # CLS + (32/8)^2 patches
    assert enc.width == 32
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training  # eval-locked
    assert torch.equal(enc(pixels), feats)  # no dropout, deterministic


def test_vision_layer_choice_and_drop_cls():
    last = VisionEncoder.from_source(TINY_VIT)
    pen = VisionEncoder.from_source(TINY_VIT, layer="penultimate", drop_cls=True)
    pixels = torch.randn(1, 3, 32, 32)
    a, b = last(pixels), pen(pixels)
    assert b.shape == (1, 16, 32)
    assert not torch.allclose(a[:, 1:], b)
    with pytest.raises(ValueError, match="layer"):
        VisionEncoder.from_source(TINY_VIT, layer="first")


def test_vision_fingerprint_tracks_weights():
    a = VisionEncoder.from_source(TINY_VIT, seed=0)
    b = VisionEncoder.from_source(TINY_VIT, seed=0)
    c = VisionEncoder.from_source(TINY_VIT, seed=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_grey_view_puts_both_views_of_a_patch_in_one_token():
    plain = VisionEncoder.from_source(TINY_VIT, seed=0)
    both = VisionEncoder.from_source(TINY_VIT, seed=0, grey_view=True)
    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 160, 70))]
    pixels = plain.processor(images)  # (2, 3, 32, 32)
    feats = both(pixels)
    n, width = plain.num_tokens, plain.width
    assert feats.shape == (2, n, 2 * width) and both.num_tokens == n and both.width == 2 * width
    assert torch.allclose(feats[..., :width], plain(pixels), atol=1e-6)  # the colour view first
    grey_images = [img.convert("L").convert("RGB") for img in images]  # PIL's own BT.601 luminance
    assert torch.allclose(both.grey(pixels), plain.processor(grey_images), atol=2 / 255)
    assert torch.allclose(feats[..., width:], plain(both.grey(pixels)), atol=1e-6)
    assert not torch.allclose(feats[..., :width], feats[..., width:])  # colour images: the views differ
    assert plain.fingerprint() != both.fingerprint()


def test_to_grey_keeps_a_grey_image_and_other_normalisations():
    processor = ImageProcessor(size=8, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))  # CLIP-like
    grey_image = Image.new("RGB", (8, 8), (90, 90, 90))
    pixels = processor([grey_image])
    assert torch.allclose(to_grey(pixels, processor), pixels, atol=1e-5)
    red = processor([Image.new("RGB", (8, 8), (255, 0, 0))])
    expected = processor([Image.new("RGB", (8, 8), (76, 76, 76))])  # 0.299 * 255
    assert torch.allclose(to_grey(red, processor), expected, atol=1 / 255 / 0.26)


def test_other_vision_towers_load():
    for source, tokens in [
        ("random:dinov2?hidden_size=32&num_hidden_layers=1&num_attention_heads=2&image_size=28&patch_size=14", 5),
        ("random:siglip_vision_model?hidden_size=32&num_hidden_layers=1&num_attention_heads=2&intermediate_size=64&image_size=28&patch_size=14", 4),
        ("random:clip_vision_model?hidden_size=32&num_hidden_layers=1&num_attention_heads=2&intermediate_size=64&image_size=28&patch_size=14", 5),
    ]:
        enc = VisionEncoder.from_source(source)
        assert enc(torch.randn(1, 3, 28, 28)).shape == (1, tokens, 32), source


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_projector_shapes(depth):
    proj = Projector(32, 48, depth=depth, activation="silu")
    assert proj(torch.randn(2, 4, 32)).shape == (2, 4, 48)
    assert sum(isinstance(m, torch.nn.Linear) for m in proj.modules()) == depth
    with pytest.raises(ValueError, match="width 32"):
        proj(torch.randn(2, 4, 31))


def test_tiny_vlm_composition_shapes(tiny_vlm_session):
    vlm = tiny_vlm_session
    cfg = vlm.config
    q = cfg.model.qformer.num_queries
    pixels = torch.randn(2, 3, 32, 32)
    feats = vlm.image_features(pixels)
    assert feats.shape == (2, 17, 32)
    tokens = vlm.image_tokens(feats)
    assert tokens.shape == (2, q, vlm.llm.hidden_size)
    t = 10
    ids = torch.randint(0, 100, (2, t))
    image_mask = torch.zeros(2, t, dtype=torch.bool)
    image_mask[:, 2 : 2 + q] = True
    out = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=image_mask,
              pixel_values=pixels, labels=ids)
    assert out.logits.shape == (2, t, len(vlm.llm.tokenizer))
    assert out.loss is not None and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="must mark 4 positions in each of 2 rows"):  # two images, no slots
        vlm(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=torch.zeros_like(image_mask),
            pixel_values=pixels)
    half = image_mask.clone()
    half[0, 2] = False  # a row with some of its slots: never valid
    with pytest.raises(ValueError, match="got \\[3, 4\\]"):
        vlm(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=half, pixel_values=pixels)


def test_only_qformer_projector_lora_get_gradients(tiny_vlm_session):
    vlm = tiny_vlm_session
    vlm.zero_grad(set_to_none=True)
    q = vlm.config.model.qformer.num_queries
    ids = torch.randint(0, 100, (2, 8))
    image_mask = torch.zeros(2, 8, dtype=torch.bool)
    image_mask[:, 1 : 1 + q] = True
    out = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=image_mask,
              pixel_values=torch.randn(2, 3, 32, 32), labels=ids)
    out.loss.backward()
    groups = vlm.parameter_groups()
    trainable = {id(p) for params in groups.values() for _, p in params}
    for name, p in vlm.named_parameters():
        if id(p) in trainable:
            continue
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert all(p.grad is not None for _, p in groups["projector"])
    assert all(p.grad is not None for _, p in groups["lora"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in groups["qformer"])
    assert all(p.grad is None for p in vlm.vision.parameters())
    counts = vlm.parameter_counts()
    assert set(groups) == {"qformer", "queries", "projector", "lora"}  # no stage-1 heads in stage 2
    assert counts["trainable"] == sum(counts[g] for g in groups)
    assert counts["lora"] > 0 and counts["frozen"] > 0
    vlm.zero_grad(set_to_none=True)
