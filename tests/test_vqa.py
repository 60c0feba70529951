"""``qvlm eval vqa``: VQAv2's answer normalisation and accuracy, question types, the command."""

from __future__ import annotations

import json

import pytest

from qvlm.cli import main
from qvlm.data.records import iter_records
from qvlm.data.sources import open_dataset
from qvlm.eval.vqa import normalize_answer, vqa_metrics, vqa_score

# (answer, what VQAv2's processPunctuation + processDigitArticle make of it), worked out by hand
CASES = [
    ("Two", "2"), ("the Red one.", "red 1"), ("yes!", "yes"), ("A dog", "dog"), ("3.5", "3.5"),
    ("dont know", "don't know"), ("fire-truck", "fire truck"), ("1,000", "1000"),
    ("two dogs, one cat", "2 dogs 1 cat"), ("U.S.A.", "usa"), ("ten\n", "10"), ("an apple", "apple"),
    ("none", "0"), ("(left)", "left"), ("red & white", "red & white"), ("It's  blue ", "it's blue"),
]


@pytest.mark.parametrize("answer,normal", CASES)
def test_normalisation_matches_the_vqav2_reference(answer, normal):
    assert normalize_answer(answer) == normal


def test_accuracy_with_one_and_with_ten_references():
    assert vqa_score("Two.", ["2"]) == 1.0 and vqa_score("three", ["2"]) == 0.0
    refs = ["2"] * 3 + ["3"] * 7  # a prediction of "2": three annotators agree
    assert vqa_score("two", refs) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_score("3", refs) == 1.0 and vqa_score("4", refs) == 0.0


def test_metrics_by_question_type_and_exact_match():
    records = [{"image": None, "messages": [
        {"role": "user", "content": "<image>\nhow many?", "type": "count"}, {"role": "assistant", "content": "two"},
        {"role": "user", "content": "colour?", "type": "colour"}, {"role": "assistant", "content": "red"}]}]
    answers = {"how many?": "2", "colour?": "Red."}
    m = vqa_metrics(lambda images, questions: [answers[q] for q in questions], records)
    assert m["n"] == 2 and m["vqa_accuracy"] == 1.0 and m["exact_match"] == 0.0
    assert m["by_type"] == {"colour": {"n": 1, "accuracy": 1.0}, "count": {"n": 1, "accuracy": 1.0}}


def test_synthetic_scenes_name_their_question_types():
    records = list(iter_records(open_dataset("synth:n=40,image_size=32", "heldout")))
    kinds = {t.get("type") for r in records for t in r["messages"] if t["role"] == "user"}
    assert kinds == {"count", "shape", "colour", "size", "yes/no"}


def test_eval_vqa_command(serve_model_dir, capsys):
    assert main(["eval", "vqa", "--model", str(serve_model_dir), "--data", "synth:n=40,image_size=32",
                 "--split", "heldout", "--max-samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 12 and 0 <= out["vqa_accuracy"] <= 1 and "count" in out["by_type"]
