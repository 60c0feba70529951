"""The benchmark report: one JSON object, or a plain-text table grouped by benchmark."""

from __future__ import annotations

import json

RATIO_GOALS = {"qformer_vs_hf_blip2": 1.2, "cached_vs_pixels_stage1": 1.5}
RATIO_MEANING = {
    "qformer_vs_hf_blip2": "Q-Former fwd+bwd at the recipe's batch: transformers Blip2QFormerModel (SDPA) time / "
                           "ours",
    "cached_vs_pixels_stage1": "stage-1 step: from image files / from cached features",
    "kv_cache_generation": "caption latency (1 image): no KV cache / KV cache",
    "kv_cache_generation_batched": "batched captions: no KV cache / KV cache",
    "checkpointing_stage1": "stage-1 step: gradient checkpointing off / on (its memory: the rows)",
    "checkpointing_stage2": "stage-2 step: gradient checkpointing off / on (its memory: the rows)",
    "compile_stage1": "stage-1 step: eager / torch.compile'd layers",
    "compile_stage2": "stage-2 step: eager / torch.compile'd layers (GPUs only)",
}


def to_json(report: dict) -> str:
    return json.dumps(report, default=float)


def throughput(r: dict) -> str:
    for key, unit in (("samples_per_s", "samples/s"), ("images_per_s", "images/s")):
        if key in r:
            return f"{r[key]:.2f} {unit}" + (f", {r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else "")
    return "-"


def memory(r: dict) -> str:
    if "peak_mem_mb" not in r:
        return "-"
    return f"{r['peak_mem_mb']:.0f} (+{r['mem_growth_mb']:.0f})"


def ratio_interval(r: dict | None) -> str:
    """"0.97-1.10 (94%, n=5)": the ratio's confidence interval from its rounds (``timing.Ratio``)."""
    if r is None:
        return ""
    return f"{r['low']:.2f}-{r['high']:.2f} ({100 * r['coverage']:.0f}%, n={r['rounds']})"


def goal_verdict(value: float, goal: float, interval: dict | None) -> str:
    """"met" only when the ratio's interval clears the goal too; a median that clears it with an
    interval that does not says so."""
    if value < goal:
        return "NOT met"
    if interval is not None and interval["low"] < goal:
        return "met by the median, not by its interval"
    return "met"


def table(report: dict) -> str:
    """Rows grouped by benchmark, then the ratios and notes."""
    head = (f"qvlm bench on {report['device']} ({report['threads']} threads), {report['precision']}, "
            f"{'--quick' if report['quick'] else 'full'}; median of {report['repeats']} timed runs (ratios give "
            f"their own n) after {report['warmup']} warm-up, variants interleaved; load average "
            f"{report['load_avg_start']} at start, {report['load_avg_end']} at end")
    mem_kind = next((r["mem_kind"] for r in report["rows"] if "mem_kind" in r), "-")
    lines = [head, f"memory: MiB, {mem_kind} (+ growth during the measured call)", ""]
    columns = ("name", "shapes", "B", "seq", "ms", "±", "throughput", "memory", "TFLOP/s", "MFU", "note")
    groups: dict[str, list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        cells = [columns] + [(r["name"], r["shapes"], str(r["batch"]), r["seq"], f"{r['ms']:.1f}",
                              f"{100 * r['spread']:.0f}%", throughput(r), memory(r),
                              str(r.get("achieved_tflop_s", "-")), f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-",
                              r.get("note", "")) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
        lines.append(f"== {group} ==")
        for c in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        lines.append("")
    lines.append("ratios (ours faster by; > 1 means the optimisation or our path wins), each with a confidence "
                 "interval from its rounds taken pairwise (its coverage, its rounds):")
    intervals = report.get("ratio_intervals", {})
    for key, value in report["ratios"].items():
        goal = RATIO_GOALS.get(key)
        if value is None:
            lines.append(f"  {key:<34}      -  (not measured: see notes)")
            continue
        verdict = "" if goal is None else f"  goal >= {goal}: {goal_verdict(value, goal, intervals.get(key))}"
        lines.append(f"  {key:<34} {value:6.2f}  {ratio_interval(intervals.get(key)):<20} "
                     f"({RATIO_MEANING.get(key, '')}){verdict}")
    if report["notes"]:
        lines.append("notes:")
        lines += [f"  - {n}" for n in report["notes"]]
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)
