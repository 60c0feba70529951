"""Visual question answering: the model's answers to the question turns of a data source, scored
with VQAv2's answer normalisation (``normalize_answer``: case, punctuation, articles, number words).

Every user turn that an assistant turn answers is one question, asked alone with the record's image
(the usual VQA protocol: the question, not the conversation before it). With one reference answer
a question scores 1 when the normalised answers agree; with several (VQAv2's ten), VQAv2's
accuracy: the mean over the references of min(1, the others that agree / 3). A user turn's
``type`` (the synthetic scenes name count, shape, colour, size and yes/no) groups the scores.
``exact_match`` compares answers only stripped and lower-cased.
"""

from __future__ import annotations

import re
from typing import Callable

from qvlm.data.decode import IMAGE_MARK

# VQAv2's evaluation tables (the official script's processPunctuation and processDigitArticle)
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
                "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
                "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
                "hows": "how's", "Id": "I'd", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
                "itll": "it'll", "lets": "let's", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
                "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
                "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "thered": "there'd",
                "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
                "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
                "whats": "what's", "whered": "where'd", "wheres": "where's", "whod": "who'd", "wholl": "who'll",
                "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "wont": "won't",
                "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
                "youre": "you're", "youve": "you've"}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQAv2's normalisation of an answer: whitespace, punctuation, then lower-cased words with number
    words as digits, articles dropped and contractions restored."""
    original = text = text.replace("\n", " ").replace("\t", " ").strip()
    for p in PUNCTUATION:  # each decided on the original text, as the reference does
        glued = p + " " in original or " " + p in original or COMMA_STRIP.search(original) is not None
        text = text.replace(p, "" if glued else " ")
    text = PERIOD_STRIP.sub("", text)
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_score(answer: str, references: list[str]) -> float:
    """One question's accuracy: exact after normalisation with one reference; VQAv2's with several."""
    pred, refs = normalize_answer(answer), [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    return sum(min(1.0, sum(pred == r for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))) \
        / len(refs)


def questions_of(records: list[dict]) -> list[dict]:
    """Every (image, question, answers, type) in the records' conversations."""
    out = []
    for r in records:
        turns = r.get("messages") or []
        for q, a in zip(turns, turns[1:]):
            if q["role"] == "user" and a["role"] == "assistant":
                answers = a.get("answers") or [a["content"]]
                out.append({"image": r["image"], "question": q["content"].replace(IMAGE_MARK, "").strip(),
                            "answers": answers, "type": q.get("type") or "all"})
    return out


def vqa_metrics(answer: Callable[[list, list[str]], list[str]], records: list[dict]) -> dict:
    """``answer(images, questions) -> answers``; the scores overall and by question type."""
    qs = questions_of(records)
    if not qs:
        raise ValueError("VQA evaluation found no question turns (user turns answered by an assistant turn)")
    preds = answer([q["image"] for q in qs], [q["question"] for q in qs])
    scores = [vqa_score(p, q["answers"]) for p, q in zip(preds, qs)]
    exact = [float(p.strip().lower() in {a.strip().lower() for a in q["answers"]}) for p, q in zip(preds, qs)]
    by_type: dict[str, list[float]] = {}
    for q, s in zip(qs, scores):
        by_type.setdefault(q["type"], []).append(s)
    return {"n": len(qs), "vqa_accuracy": sum(scores) / len(qs), "exact_match": sum(exact) / len(qs),
            "by_type": {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(by_type.items())},
            "samples": [{"question": q["question"], "answer": p, "truth": q["answers"][0], "type": q["type"]}
                        for q, p in zip(qs[:20], preds)]}


def evaluate_vqa(answer: Callable[[list, list[str]], list[str]], cfg, source: str | None = None,
                 split: str = "test", max_samples: int | None = None) -> dict:
    """``vqa_metrics`` over the first ``max_samples`` (default ``eval.max_samples``) records of a source."""
    from qvlm.eval.retrieval import load_records

    return vqa_metrics(answer, load_records(cfg, source, split, max_samples or cfg.eval.max_samples))
