"""Caption scores: the COCO caption metrics, and scene-level scores on synthetic scenes.

``caption_metrics`` gives BLEU-4, METEOR, ROUGE-L and CIDEr as BLIP-2 reports them on COCO (§4.2),
computed by ``pycocoevalcap``, the reference implementation of the COCO caption evaluation
(github.com/salaniz/pycocoevalcap). It needs Java twice: the Stanford PTB tokenizer and METEOR
(both jars ship in the wheel and run offline). Without Java the captions are tokenised in Python
(lowercase, punctuation removed), BLEU/ROUGE-L/CIDEr are still computed, and METEOR is None with
a note in ``warnings``. SPICE is not used (it downloads Stanford models on first use).

CIDEr weights n-grams by their rarity across the references of *all* images (tf-idf), so it is a
corpus score: with a single image every weight is log(1) = 0 and CIDEr is 0.

``scene_metrics`` names the synthetic-scene scores of ``qvlm.data.scenes_metrics`` as the run
reports do (``color_shape_acc``, ``count_acc``, ``exact_match``). ``evaluate_captions`` scores the
captions that a given function (``qvlm.inference.describe_images``) writes for a data source.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Callable

from qvlm.data.scenes_metrics import score_captions

SCENE_NAMES = {"color_shape": "color_shape_acc", "count": "count_acc", "exact": "exact_match"}
PUNCTUATION = re.compile(r"[^\w\s]")


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """The Python stand-in for the PTB tokenizer: "A red Circle, left." -> "a red circle left"."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


def _clean(text: str) -> str:
    # a newline would split one caption into two lines for the tokenizer; "|||" separates fields for METEOR
    return " ".join(text.replace("|", " ").split())


def _ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    if out.keys() != captions.keys() or any(len(out[i]) != len(caps) for i, caps in captions.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return out


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """COCO caption scores of one prediction per image against that image's reference captions.

    Returns ``bleu4``, ``meteor`` (None without Java), ``rouge_l``, ``cider``, ``n`` and
    ``warnings`` (a list of strings, empty when every metric ran as in the COCO toolkit).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    res = {i: [_clean(p)] for i, p in enumerate(predictions)}
    gts = {i: [_clean(r) for r in refs] for i, refs in enumerate(references)}
    warnings: list[str] = []
    has_java = java_available()
    ptb = has_java
    if has_java:
        try:
            res, gts = _ptb_tokenize(res), _ptb_tokenize(gts)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            # e.g. a read-only install: the tokenizer writes its input file beside its jar
            warnings.append(f"PTB tokenizer failed ({exc}); captions tokenised in Python instead")
            ptb = False
    else:
        warnings.append("java not found: captions tokenised in Python instead of the PTB tokenizer, METEOR skipped")
    if not ptb:
        res = {i: [simple_tokenize(c) for c in caps] for i, caps in res.items()}
        gts = {i: [simple_tokenize(c) for c in caps] for i, caps in gts.items()}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    meteor = _meteor(gts, res, warnings) if has_java else None
    return {"bleu4": float(bleu[3]), "meteor": meteor, "rouge_l": float(rouge_l), "cider": float(cider),
            "n": len(predictions), "warnings": warnings}


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]], warnings: list[str]) -> float | None:
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()  # starts a Java process (loads its paraphrase table: seconds)
    except OSError as exc:
        warnings.append(f"METEOR could not start ({exc}); skipped")
        return None
    try:
        score, _ = scorer.compute_score(gts, res)
    except ValueError as exc:  # the Java process died: its output was not a number
        if scorer.lock.locked():  # compute_score left it held, and __del__ takes it to end the process
            scorer.lock.release()
        warnings.append(f"METEOR failed ({exc}); skipped")
        return None
    finally:
        del scorer  # its __del__ ends the Java process
    return float(score)


def scene_metrics(predictions: list[str], attributes: list[dict]) -> dict:
    """Synthetic-scene scores of captions against the scenes' attributes, under report names:
    ``color_shape_acc``, ``count_acc``, ``exact_match`` (and ``n``)."""
    scores = score_captions(predictions, attributes)
    return {SCENE_NAMES.get(k, k): v for k, v in scores.items()}


def evaluate_captions(describe: Callable[[list], list[str]], cfg, source: str | None = None, split: str = "test",
                      max_samples: int | None = None, coco: bool = True) -> tuple[dict, list[dict]]:
    """(metrics, samples) for the captions ``describe(images)`` writes: COCO caption metrics against
    each record's caption (unless ``coco`` is False: they run Java twice), plus ``color_shape_acc``,
    ``count_acc`` and ``exact_match`` when the records have scene attributes."""
    from qvlm.eval.retrieval import load_records

    records = load_records(cfg, source, split, max_samples or cfg.eval.max_samples)
    if not records:
        raise ValueError("caption evaluation got no usable records")
    preds = describe([r["image"] for r in records])
    metrics = {"n": len(records)}
    if coco:
        metrics.update(caption_metrics(preds, [[r["caption"]] for r in records]))
    if all(r.get("attributes") for r in records):
        metrics.update(scene_metrics(preds, [r["attributes"] for r in records]))
    samples = [{"key": r["key"], "image": r["image"], "caption": p, "truth": r["caption"],
                "attributes": r.get("attributes")} for r, p in zip(records, preds)]
    return metrics, samples
