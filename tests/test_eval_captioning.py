"""Caption metrics: COCO scores (pycocoevalcap) on hand-checkable captions, the no-Java fallback,
and the names of the synthetic-scene scores."""

import shutil

import pytest

from qvlm.data.scenes_metrics import score_captions
from qvlm.eval.captioning import caption_metrics, java_available, scene_metrics, simple_tokenize

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java runs the PTB tokenizer and METEOR")

# Two images: CIDEr weights n-grams by rarity across images, so one image alone always scores 0.
CAPTIONS = ["a large red circle on the left and a small blue square on the right",
            "two green triangles at the top of the picture next to a yellow star"]
WRONG = ["purple elephants dancing quietly", "seven old bicycles rusting outside"]


@pytest.fixture(scope="module")
def identical():
    return caption_metrics(CAPTIONS, [[c] for c in CAPTIONS])


def test_identical_captions_score_full_marks(identical):
    assert identical["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert identical["rouge_l"] == pytest.approx(1.0)
    assert identical["cider"] > 0
    assert identical["n"] == 2


@needs_java
def test_java_metrics_run_offline(identical):
    assert identical["warnings"] == []
    assert identical["meteor"] == pytest.approx(1.0)


@needs_java
def test_wrong_captions_score_near_zero():
    m = caption_metrics(WRONG, [[c] for c in CAPTIONS])
    assert m["bleu4"] < 1e-6 and m["rouge_l"] == 0.0 and m["cider"] == 0.0
    assert m["meteor"] == pytest.approx(0.0, abs=1e-3)


def test_rouge_l_by_hand():
    # LCS("a red circle on the left", "a big red circle") = "a red circle": P = 3/6, R = 3/4;
    # pycocoevalcap's F-measure with beta = 1.2: (1 + b^2) P R / (R + b^2 P) = 0.915 / 1.47
    m = caption_metrics(["a red circle on the left", CAPTIONS[1]], [["a big red circle"], [CAPTIONS[1]]])
    assert m["rouge_l"] == pytest.approx((0.915 / 1.47 + 1.0) / 2)


def test_without_java_python_tokenisation_and_no_meteor(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no java binary can be found (nor started)
    assert not java_available()
    preds = ["A large red Circle, on the LEFT... and a small blue square on the right!", CAPTIONS[1] + "."]
    m = caption_metrics(preds, [[c] for c in CAPTIONS])
    assert m["meteor"] is None
    assert any("java" in w for w in m["warnings"])
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-6)  # case and punctuation do not count
    assert m["rouge_l"] == pytest.approx(1.0) and m["cider"] > 0
    wrong = caption_metrics(WRONG, [[c] for c in CAPTIONS])
    assert wrong["bleu4"] < 1e-6 and wrong["rouge_l"] == 0.0 and wrong["cider"] == 0.0


def test_simple_tokenize():
    assert simple_tokenize("A red Circle,\non the LEFT.") == "a red circle on the left"


def test_caption_metrics_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption_metrics(CAPTIONS, [[CAPTIONS[0]]])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics(CAPTIONS[:1], [[]])


def test_scene_metrics_names_and_values():
    two = {"left": {"size": "large", "color": "red", "shape": "circle"},
           "right": {"size": "small", "color": "blue", "shape": "square"}}
    one = {"top": {"size": "small", "color": "green", "shape": "triangle"}}
    preds = ["a large red circle on the left and a small blue square on the right",  # all right
             "a small red triangle at the top",  # right count, wrong colour
             "a large green triangle at the bottom"]  # right colour and shape, wrong size and place
    m = scene_metrics(preds, [two, one, one])
    assert m == {"color_shape_acc": pytest.approx(2 / 3), "count_acc": 1.0, "exact_match": pytest.approx(1 / 3),
                 "n": 3}
    raw = score_captions(preds, [two, one, one])
    assert (m["color_shape_acc"], m["count_acc"], m["exact_match"]) == (raw["color_shape"], raw["count"], raw["exact"])


def test_stage1_model_captions_with_its_own_itg_head(tmp_path, capsys):
    import json

    import torch

    from conftest import CONFIGS
    from qvlm.cli import main
    from qvlm.config import load_config
    from qvlm.data.synth import make_scene, render
    from qvlm.inference import qformer_caption
    from qvlm.models.vlm import VLM

    torch.manual_seed(0)
    model = VLM.from_config(load_config(CONFIGS / "tiny.yaml"))
    assert model.llm is None
    model.save_pretrained(tmp_path / "s1")
    loaded = VLM.from_pretrained(tmp_path / "s1").eval()
    images = [render(make_scene(0, "test", i), 32) for i in range(3)]
    first = qformer_caption(loaded, images, max_new_tokens=5, batch_size=2)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert qformer_caption(loaded, images, max_new_tokens=5, batch_size=3) == first  # batching-independent
    assert main(["eval", "caption", "--model", str(tmp_path / "s1"), "--max-samples", "4", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 4 and 0.0 <= metrics["color_shape_acc"] <= 1.0
