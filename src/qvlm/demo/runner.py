"""``qvlm demo``: the whole recipe offline, on a laptop CPU, in one command.

1. pretrain the small demo vision tower on synthetic scenes, then freeze it;
2. stage 1: Q-Former (from the packaged MiniLM BERT) with ITC + ITG (ITM is available, see
   ``plan.yaml``), retrieval eval;
3. stage 2: projector + LoRA (from the image on) on the packaged SmolLM2-135M-Instruct (the stage-1 Q-Former
   frozen);
4. evaluate captions on i.i.d. test scenes and on scenes with never-trained colour–shape pairs,
   and the LLM's retention of its text knowledge;
5. write ``OUT/report.html``, ``OUT/metrics.json``, loss curves as PNG and ``OUT/model/``.

The plan (config deltas, steps, learning rates) is ``plan.yaml`` beside this module; ``quick=True``
runs its quick plan: the same pipeline on tiny random models in seconds (for tests).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import sys
import time
from importlib.resources import files
from pathlib import Path

import yaml

from qvlm.eval.captioning import evaluate_captions


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a training step frees for the next step: every block from
    the heap (``M_MMAP_MAX`` 0) and no trimming of it below 2 GiB (``M_TRIM_THRESHOLD``). A step
    allocates the same blocks every time; otherwise the kernel maps, zeroes and faults in their pages
    again each step. The resident size then stays at its peak. Skipped where the C library is not
    glibc and with ``QVLM_MALLOC=system``; returns whether both settings took."""
    if os.environ.get("QVLM_MALLOC", "").strip().lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's <malloc.h>
    return (hasattr(libc, "mallopt") and libc.mallopt(m_mmap_max, 0) == 1
            and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1)  # a C int: the largest, 2 GiB


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides a step's speed here


def cpu_features() -> list[str]:
    """The CPU_FLAGS this machine's CPU has (from /proc/cpuinfo; none where it is absent)."""
    info = Path("/proc/cpuinfo")
    flags = set(info.read_text().split()) if info.is_file() else set()
    return [f for f in CPU_FLAGS if f in flags]


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the CPU (or GPU) has it, else fp32; ``bf16`` without it is a usage error."""
    import torch

    from qvlm.config import ConfigError
    from qvlm.train import loop

    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    has = loop.bf16_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "bf16" and not has:
        raise ConfigError("--precision bf16: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so "
                          "bf16 would be emulated and slower; use --precision fp32 (or auto)")
    return ("bf16" if has else "fp32") if precision == "auto" else precision


def load_plan(quick: bool = False) -> dict:
    """The full or the quick plan from the package's ``plan.yaml`` (keys: config, vision, shared,
    stage1, stage2, n_eval)."""
    plans = yaml.safe_load((files("qvlm.demo") / "plan.yaml").read_text(encoding="utf-8"))
    return plans["quick" if quick else "full"]


def stage_config(out: Path, plan: dict, stage: int, common: list[str], extra: tuple | list = ()):
    """The config of ``stage``: the plan's deltas (written to ``OUT/demo-config.yaml``), then
    ``common``, the stage, ``extra`` and the plan's overrides of that stage."""
    from qvlm.config import load_config

    path = out / "demo-config.yaml"
    path.write_text(yaml.safe_dump(plan["config"], sort_keys=False), encoding="utf-8")
    return load_config(path, [*common, f"train.stage={stage}", f"eval.max_samples={plan['n_eval']}", *extra,
                              *plan[f"stage{stage}"]])


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out: str | Path, quick: bool = False, progress: bool = True, resume: bool = False,
             precision: str = "auto") -> dict:
    """Run the pipeline into ``out``; with ``resume`` finished steps are reused (the vision tower,
    a stage whose model folder exists) and an interrupted stage continues from its checkpoint.
    ``precision`` (auto, bf16, fp32) holds for every stage, the tower's pretraining included."""
    import torch

    from qvlm.demo.vision_pretrain import run_pretrain_vision
    from qvlm.eval.retrieval import evaluate_retrieval
    from qvlm.train.loop import train

    precision = resolve_precision(precision)
    keep_freed_memory()
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = load_plan(quick)
    log(f"precision {precision}; CPU features: {', '.join(cpu_features()) or 'none of ' + ', '.join(CPU_FLAGS)}; "
        f"{torch.get_num_threads()} threads")
    log("1/5 pretraining the demo vision tower on synthetic scenes")
    if resume and (out / "vision" / "metrics.json").is_file():
        vision = json.loads((out / "vision" / "metrics.json").read_text())
    else:
        vision = run_pretrain_vision(out / "vision", progress=progress, bf16=precision == "bf16", **plan["vision"])
    grey_view = bool(vision.get("settings", {}).get("grey_view", False))  # how the tower was trained
    common = [f"model.vision.source={out / 'vision'}", f"model.vision.grey_view={str(grey_view).lower()}",
              f"data.cache_dir={out / 'cache'}", f"train.precision={precision}", *plan["shared"]]
    cfg1 = stage_config(out, plan, 1, common)
    log(f"2/5 stage 1: Q-Former with {' + '.join(k.upper() for k, w in cfg1.train.losses.items() if w > 0)}")
    stage1 = finished_eval(out / "stage1") if resume else None
    if stage1 is None:
        stage1 = train(cfg1, out / "stage1", resume=resume, eval_fn=evaluate_retrieval, progress=progress,
                       overwrite=not resume)["eval"]
    stage1 = {**stage1, **qformer_captions(out / "stage1" / "model", cfg1, plan["n_eval"], progress)}
    log("3/5 stage 2: projector + LoRA on the LLM")
    cfg2 = stage_config(out, plan, 2, common, [f"train.init_from={out / 'stage1' / 'model'}"])
    model = None  # the trained model stays in memory for the evaluation (no second GGUF load)
    if not (resume and (out / "stage2" / "model" / "config.yaml").is_file()):
        model = train(cfg2, out / "stage2", resume=resume, progress=progress, return_model=True,
                      overwrite=not resume)["model"]
    log("4/5 evaluating captions, held-out composition and retention")
    results = evaluate(out, cfg2, plan["n_eval"], progress, model)
    metrics = summary(vision, stage1, results, time.perf_counter() - start)
    log("5/5 writing the report")
    write_report(out, metrics, results)
    log(f"done in {metrics['wall_s']:.0f} s: report at {out / 'report.html'}")
    return metrics


def finished_eval(run: Path) -> dict | None:
    """The last evaluation of a finished run (its model folder exists), else None."""
    if not (run / "model" / "config.yaml").is_file():
        return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    return rows[-1]["eval"] if rows else None


def describer(model, cfg, progress: bool):
    """Greedy captions of a list of images by ``model`` at the config's eval settings."""
    from qvlm.inference import describe_images

    return lambda images: describe_images(model, images, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress)


def qformer_captions(model_dir: Path, cfg, n_eval: int, progress: bool) -> dict:
    """Scene scores of the stage-1 Q-Former's own greedy captions (ITG head, no LLM) on the test
    scenes: what the queries carry into stage 2."""
    from qvlm.models.vlm import VLM

    model = VLM.from_pretrained(model_dir).eval()
    test, _ = evaluate_captions(describer(model, cfg, progress), cfg, split="test", max_samples=n_eval, coco=False)
    return {f"qformer_{k}": test[k] for k in ("color_shape_acc", "count_acc", "exact_match")}


def evaluate(out: Path, cfg, n_eval: int, progress: bool, model=None) -> dict:
    """Captions on the test and held-out scenes (COCO metrics on the test ones only: the summary
    reports scene scores for the held-out ones) and retention, of ``model`` or the saved stage-2 model."""
    from qvlm.eval.retention import retention_report
    from qvlm.models.vlm import VLM

    model = (model if model is not None else VLM.from_pretrained(out / "stage2" / "model")).eval()
    describe = describer(model, cfg, progress)
    test, test_samples = evaluate_captions(describe, cfg, split="test", max_samples=n_eval)
    held, held_samples = evaluate_captions(describe, cfg, split="heldout", max_samples=n_eval, coco=False)
    vqa = held_out_vqa(model, cfg, n_eval, progress)
    retention = retention_report(model.llm)
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    shutil.copytree(out / "stage2" / "model", out / "model")
    return {"test": test, "heldout": held, "vqa": vqa, "retention": retention,
            "samples": {"test": test_samples, "heldout": held_samples}}


def held_out_vqa(model, cfg, n_eval: int, progress: bool) -> dict:
    """Answers to the held-out scenes' questions (count, shape, colour, size, yes/no), each asked alone."""
    from qvlm.eval.vqa import evaluate_vqa
    from qvlm.inference import answer_questions

    def answer(images, questions):
        return answer_questions(model, images, questions, cfg.eval.batch_size, 8, progress)

    return evaluate_vqa(answer, cfg, split="heldout", max_samples=n_eval)


def summary(vision: dict, stage1: dict, results: dict, wall_s: float) -> dict:
    test, held, ret = results["test"], results["heldout"], results["retention"]
    return {
        "vision": {"attr_acc": vision["attr_acc"], "heldout_attr_acc": vision.get("heldout_attr_acc"),
                   "shape_acc": vision.get("shape_acc"), "heldout_shape_acc": vision.get("heldout_shape_acc"),
                   "scene_object_acc": vision.get("scene_object_acc")},
        "stage1": {k: stage1[k] for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "itc_i2t_r1", "itc_t2i_r1", "n",
                                           "qformer_color_shape_acc", "qformer_count_acc", "qformer_exact_match")},
        "stage2": {
            "color_shape_acc": test["color_shape_acc"], "count_acc": test["count_acc"],
            "exact_match": test["exact_match"], "cider": test["cider"], "bleu4": test["bleu4"],
            "meteor": test.get("meteor"), "rouge_l": test["rouge_l"], "n": test["n"],
            "heldout_color_shape_acc": held["color_shape_acc"], "heldout_count_acc": held["count_acc"],
            "heldout_exact_match": held["exact_match"], "heldout_n": held["n"],
            "heldout_vqa_accuracy": results["vqa"]["vqa_accuracy"], "heldout_vqa_n": results["vqa"]["n"],
            "heldout_vqa_by_type": {t: v["accuracy"] for t, v in results["vqa"]["by_type"].items()},
        },
        "retention": {k: ret[k] for k in ("ppl_base", "ppl_adapted", "ppl_ratio", "facts_kept", "facts_total",
                                          "facts_base")},
        "wall_s": wall_s,
    }


def write_report(out: Path, metrics: dict, results: dict) -> None:
    from qvlm.data.scenes_metrics import color_shape
    from qvlm.demo.html_report import plot_curves, read_metrics, write_html

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    curves = []
    for stage, keys in (("stage1", ["loss", "itc", "itm", "itg"]), ("stage2", ["loss", "lm"])):
        rows = read_metrics(out / stage / "metrics.jsonl")
        curves.append(plot_curves(rows, keys, out / f"{stage}_loss.png", f"{stage} training loss").name)
    sections = []
    for split, title in (("test", "Test scenes (seen colour–shape pairs)"),
                         ("heldout", "Held-out scenes (a never-trained colour–shape pair)")):
        items = [{**s, "correct": color_shape(s["caption"], s["attributes"])}
                 for s in results["samples"][split][:24]]
        sections.append((title, items))
    write_html(out / "report.html", "qvlm demo", metrics, sections, curves)
    answers = results["retention"]["answers"]
    (out / "retention_answers.json").write_text(json.dumps(answers, indent=2), encoding="utf-8")
