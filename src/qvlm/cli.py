"""The ``qvlm`` command line: one subcommand per task (``qvlm --help``; docs/). ``main(argv) -> int``.

Exit codes: 0 success, 2 usage or config error (the message names the key or flag), 1 runtime
failure. ``--json`` prints exactly one JSON object on stdout; logs and progress go to stderr.
Each command's body lives in its own small function; heavy imports happen inside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from qvlm.config import ConfigError, dump_config, load_config
from qvlm.data.records import DataSourceError
from qvlm.model_sources import SourceError, UnreadableFile


class UsageError(Exception):
    """A bad flag or argument combination (exit code 2)."""


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=float))


def emit(report: dict, as_json: bool) -> None:
    """One JSON object on stdout with --json, else one ``key: value`` line per entry."""
    if as_json:
        print_json(report)
    else:
        for key, value in report.items():
            print(f"{key}: {value}")


# ---- commands ---------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """End-to-end smoke: build every block from the config, run one image through the VLM,
    and let the LLM answer a text question (a quick check that every source resolves)."""
    from qvlm.demo.smoke import run_smoke

    cfg = load_config(args.config, args.overrides)
    report = run_smoke(cfg, prompt=args.prompt)
    emit(report, args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qvlm import distributed as D
    from qvlm.eval.retrieval import eval_source, evaluate_retrieval
    from qvlm.train.loop import RunExists, check_run_folder, train

    cfg = load_config(args.config, args.overrides)
    try:
        check_run_folder(Path(args.out), args.resume, args.overwrite)
    except RunExists as exc:
        raise UsageError(str(exc)) from exc
    eval_fn = None
    if cfg.train.stage == 1 and cfg.eval.max_samples > 0:
        if eval_source(cfg) is None:
            eprint("note: no periodic evaluation: data.source is streamed shards; set eval.data to enable it")
        else:
            eval_fn = evaluate_retrieval
    try:
        result = train(cfg, args.out, resume=args.resume, eval_fn=eval_fn, progress=not args.no_progress,
                       overwrite=args.overwrite)
    finally:
        several = D.teardown()  # under torchrun: stop the process group's threads before exit
    if args.json:
        print_json(result)
    if several:
        D.exit_rank(0)  # the run is saved: skip the interpreter's teardown, where gloo can abort a rank
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qvlm.eval.retrieval import evaluate_retrieval
    from qvlm.models.vlm import VLM

    if args.task == "classify" and not args.classes:
        raise UsageError("eval classify needs --classes NAME,NAME,...")
    stage2 = (Path(args.model) / "projector.safetensors").is_file()
    if args.task in ("retention", "vqa") and not stage2:
        raise UsageError(f"eval {args.task} needs a stage-2 model; {args.model} has no projector (stage 1?)")
    # caption on a stage-1 model: the Q-Former's own ITG captions (what the queries carry)
    needs_llm = args.task in ("retention", "vqa") or (args.task == "caption" and stage2)
    model = VLM.from_pretrained(args.model, with_llm=needs_llm or None).eval()
    cfg = model.config
    if args.max_samples is not None:
        cfg.eval.max_samples = args.max_samples
    if args.task == "caption":
        from qvlm.eval.captioning import evaluate_captions
        from qvlm.inference import describe_images

        def describe(images):
            return describe_images(model, images, cfg.eval.batch_size, cfg.eval.max_new_tokens, not args.json,
                                   args.compile)

        metrics, _ = evaluate_captions(describe, cfg, source=args.data, split=args.split)
    elif args.task == "vqa":
        from qvlm.eval.vqa import evaluate_vqa
        from qvlm.inference import answer_questions

        def answer(images, questions):
            return answer_questions(model, images, questions, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                    not args.json)

        metrics = evaluate_vqa(answer, cfg, source=args.data, split=args.split)
        metrics.pop("samples")
    elif args.task == "retention":
        from qvlm.eval.retention import retention_report

        metrics = retention_report(model.llm)
    elif args.task == "classify":
        from qvlm.eval.classify import classify_metrics

        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        metrics = classify_metrics(model, cfg, classes, args.template, source=args.data, split=args.split)
    else:
        metrics = evaluate_retrieval(model, cfg, source=args.data, split=args.split)
    emit(metrics, args.json)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from qvlm.data import commands

    if args.data_command == "synth":
        report = commands.run_synth(args.out, args.n, args.seed, image_size=args.image_size,
                                    n_test=args.n_test, n_heldout=args.n_heldout)
    else:
        report = commands.run_inspect(args.source, grid=args.grid)
    if getattr(args, "json", False):
        print_json(report)
    else:
        print(json.dumps(report, indent=2))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Which checkpoints of a run are intact (sizes and SHA-256 against what was written); exit 1
    when any is damaged."""
    from qvlm.train.checkpoint import checkpoint_problems, checkpoint_states

    root = Path(args.dir)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    states = [(root, checkpoint_problems(root))] if root.name.startswith("step-") else checkpoint_states(root)
    if not states or not root.is_dir():
        raise UsageError(f"{args.dir}: no checkpoints (give a run folder, its checkpoints/ or one step-N/)")
    report = {"checkpoints": [{"name": p.name, "intact": not bad, "problems": bad} for p, bad in states],
              "newest_intact": next((p.name for p, bad in states if not bad), None)}
    if args.json:
        print_json(report)
    for entry in [] if args.json else report["checkpoints"]:
        print(f"{entry['name']}: {'intact' if entry['intact'] else 'damaged'}")
        for problem in entry["problems"]:
            print(f"  {problem}")
    return 0 if all(not bad for _, bad in states) else 1


def cmd_cache_features(args: argparse.Namespace) -> int:
    from qvlm.data.cache import run_cache_features
    from qvlm.models.vision import VisionEncoder

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache_dir:
        raise UsageError("set data.cache_dir (e.g. data.cache_dir=runs/cache) to say where the cache goes")
    v = cfg.model.vision
    encoder = VisionEncoder.from_source(v.source, layer=v.layer, drop_cls=v.drop_cls, seed=cfg.train.seed,
                                        trust_remote_code=cfg.model.trust_remote_code, grey_view=v.grey_view)
    report = {}
    for split in args.splits:
        report[split] = run_cache_features(cfg.data.source, encoder, cfg.data.cache_dir, split=split,
                                           augment=cfg.data.augment, max_pixels=cfg.data.max_image_pixels,
                                           progress=True)
    if args.json:
        print_json(report)
    else:
        for split, summary in report.items():
            print(f"{split}: {summary.get('summary', summary)}")
    return 0


def cmd_pretrain_vision(args: argparse.Namespace) -> int:
    from qvlm.demo.vision_pretrain import run_pretrain_vision

    metrics = run_pretrain_vision(args.out, seed=args.seed, max_steps=args.max_steps, max_seconds=args.max_seconds,
                                  target_acc=args.target_acc, readout=args.readout, grey_view=args.grey_view,
                                  bf16=args.precision == "bf16", progress=not args.json)
    if args.json:
        print_json(metrics)
    else:
        print(f"vision tower written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from qvlm.data.decode import read_image_file
    from qvlm.inference import caption
    from qvlm.models.generate import GenerationConfig
    from qvlm.models.vlm import VLM

    images = [read_image_file(path) for path in args.images]
    model = VLM.from_pretrained(args.model, with_llm=True).eval()
    gen = GenerationConfig(max_new_tokens=args.max_tokens, compile=args.compile)
    texts = caption(model, images, prompt=args.prompt, gen=gen)
    if args.json:
        print_json({"captions": [{"image": p, "caption": t} for p, t in zip(args.images, texts)]})
    else:
        for path, text in zip(args.images, texts):
            print(f"{path}\t{text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qvlm.data.decode import read_image_file
    from qvlm.inference import chat
    from qvlm.models.generate import GenerationConfig
    from qvlm.models.vlm import VLM

    image = read_image_file(args.image)
    model = VLM.from_pretrained(args.model, with_llm=True).eval()
    gen = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or 1.0, compile=args.compile)
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
    if args.prompt:
        print(chat(model, image, [*history, {"role": "user", "content": args.prompt}], gen=gen), flush=True)
        return 0
    while question := read_question():  # interactive, with the history: an empty line or EOF ends it
        history.append({"role": "user", "content": question})
        answer = chat(model, image, history, gen=gen)
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def read_question() -> str | None:
    try:
        return input("> ").strip() or None
    except EOFError:
        return None


def cmd_export(args: argparse.Namespace) -> int:
    from qvlm.export import export_model

    report = export_model(args.model, args.out, merge_lora=args.merge_lora, fmt=args.format)
    print_json(report) if args.json else print(f"exported to {report['out']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from qvlm.import_blip2 import import_blip2

    try:
        report = import_blip2(args.source, args.out, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        print_json(report)
    else:
        print(f"imported {report['architecture']} into {report['out']} (stage {report['stage']}); fresh: "
              + "; ".join(report["fresh"]))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from qvlm.data.decode import read_image_file
    from qvlm.inference import score
    from qvlm.models.vlm import VLM

    images = [read_image_file(path) for path in args.images]
    scores = score(VLM.from_pretrained(args.model, with_llm=False), images, args.texts, args.batch_size)
    if args.json:
        print_json({"itc": scores.itc.tolist(), "itm": scores.itm.tolist()})
        return 0
    print("image\ttext\titc\titm")
    for i, path in enumerate(args.images):
        for t, text in enumerate(args.texts):
            print(f"{path}\t{text}\t{scores.itc[i, t]:.4f}\t{scores.itm[i, t]:.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qvlm.demo.runner import run_demo

    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress, resume=args.resume,
                       precision=args.precision)
    if args.json:
        print_json(metrics)
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Speed benchmarks with their references in the same run (current figures: docs/performance.md)."""
    import torch

    from qvlm.bench import check_sections, run_bench
    from qvlm.bench.table import table, to_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch: "
                         f"{torch.__version__}); use --device cpu")
    if args.batch_search < 0:
        raise UsageError(f"--batch-search must be >= 0, got {args.batch_search}")
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    try:
        check_sections(sections)
    except ValueError as exc:
        raise UsageError(f"--sections {args.sections!r}: {exc}") from exc
    write = None
    if args.json_out:
        out = Path(args.json_out)
        if out.is_dir() or not out.parent.is_dir():  # say so now, not after the first section's minutes
            raise UsageError(f"--json-out {out}: " + ("is a directory" if out.is_dir()
                                                       else f"no such directory {out.parent}"))

        def write(report: dict) -> None:  # replaced atomically after every section
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(to_json(report))
            os.replace(tmp, out)
    report = run_bench(quick=args.quick, device=device, precision=args.precision, plan=args.plan,
                       batch_search=args.batch_search, sections=sections, partial=write)
    if write is not None:
        write(report)
    print(to_json(report) if args.json else table(report), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from qvlm.serve.app import API_KEY_ENV, create_app, serve
        from qvlm.serve.engine import Engine
        from qvlm.serve.schemas import Limits
    except ImportError as exc:
        raise UsageError(f"qvlm serve needs the serve extra: pip install 'qvlm[serve]' ({exc})") from exc
    model = Path(args.model)
    if not (model / "config.yaml").is_file():
        raise UsageError(f"--model {model} is not a saved qvlm model folder (no config.yaml)")
    if not (model / "projector.safetensors").is_file():
        raise UsageError(f"--model {model} has no projector (a stage-1 model?); serving needs a stage-2 model")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    try:
        limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                        max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
                        max_tokens=args.max_tokens, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                        allowed_image_hosts=tuple(args.allow_image_host))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        eprint(f"qvlm serve: warning: listening on {args.host} without an API key (set --api-key or {API_KEY_ENV})")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine.load(model, limits, model_id=args.model_name, device=device, compile=args.compile)
    if args.compile:
        eprint("qvlm serve: compiling the decoding step (once, before serving; a minute or more on a CPU)")
        eprint(f"qvlm serve: compiled in {engine.warm_up():.0f} s")
    auth = "required" if api_key else "off"
    serve(create_app(engine, api_key=api_key), args.host, args.port, log_level=args.log_level,
          announce=lambda url: eprint(f"qvlm serve: model {engine.model_id!r} on {url} (API key {auth})"))
    # uvicorn only returns once a signal stopped it; it re-raises the signal afterwards, but
    # whether that reaches us as KeyboardInterrupt depends on the handlers around it: say it here
    eprint("qvlm serve: interrupted")
    return 130


# ---- parser -----------------------------------------------------------------------------------


COMPILE_HELP = ("decode through a static KV cache and a torch.compile'd LLM step (CUDA graphs on a GPU): "
                "faster tokens after a one-time compilation of a minute or more")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (deltas over the defaults)")
    p.add_argument("overrides", nargs="*", help="overrides like train.lr=3e-4 model.qformer.num_queries=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvlm", description="Build, train, evaluate and serve a BLIP-2-style VLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config as YAML")
    add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="the offline end-to-end demo: OUT/report.html, metrics.json, model/")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="tiny random models, seconds (a smoke test)")
    p.add_argument("--resume", action="store_true", help="reuse finished steps in --out, continue an interrupted one")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="every stage, the tower's pretraining included; auto: bf16 where the CPU has it "
                        "(AVX512-BF16 or AMX), else fp32; bf16 on a CPU without it is refused")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="speed benchmarks against references, measured in the same run")
    p.add_argument("--quick", action="store_true", help="few repeats, small batches (about 3 minutes on 2 CPU cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows, ratios, notes)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has it (as train.precision)")
    p.add_argument("--batch-search", type=int, default=0, metavar="MAX",
                   help="train steps at real shapes use the largest power-of-two batch up to MAX that fits (GPUs)")
    p.add_argument("--sections", default="qformer,stage1,stage2,generation", metavar="LIST",
                   help="comma-separated sections to run, in this order (default: all four)")
    p.add_argument("--json-out", default=None, metavar="FILE",
                   help="also write the JSON report to FILE, updated after every section")
    p.add_argument("--plan", choices=["quick", "full", "smoke"], default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("smoke", help="build every block from a config and run one forward + one LLM answer")
    add_config_args(p)
    p.add_argument("--prompt", default="What is the capital of France?", help="text-only question for the LLM")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("train", help="train stage 1 or 2 (train.stage) and write OUT/model")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/, model/")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the run already in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model")
    p.add_argument("task", choices=["retrieval", "classify", "caption", "retention", "vqa"])
    p.add_argument("--model", required=True, help="a model folder (OUT/model of qvlm train)")
    p.add_argument("--data", default=None, help="data source (default: the model's eval.data or data.source)")
    p.add_argument("--split", default="test", help="split of the data source (default: test)")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on at most this many records")
    p.add_argument("--classes", default="", help="classify: comma-separated class names, e.g. circle,square,triangle")
    p.add_argument("--template", default="a photo of a {}", help="classify: prompt with {} for the class name")
    p.add_argument("--compile", action="store_true", help="caption, stage-2 models: " + COMPILE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("cache-features", help="compute the frozen vision features once (data.cache_dir)")
    add_config_args(p)
    p.add_argument("--splits", nargs="+", default=["train"], help="splits of data.source to cache")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_cache_features)

    p = sub.add_parser("pretrain-vision", help="train the offline demo's small vision tower on synthetic scenes")
    p.add_argument("--out", default="runs/vision", help="HF-format folder for model.vision.source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=600, help="training steps (the learning-rate schedule's length)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="also stop after this many seconds of training (the tower then depends on the machine)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="fp32", help="bf16 autocast or fp32")
    p.add_argument("--target-acc", type=float, default=0.99,
                   help="stop early once a held-in check reaches this accuracy (> 1 = use the whole budget)")
    p.add_argument("--readout", choices=["spatial", "flat", "bound"], default="spatial",
                   help="spatial (default): a head shared by every token, pooled per position (tokens that "
                        "describe their own region); bound: spatial plus a head on the mean token (the average "
                        "says which object is where; the demo's choice); flat: one linear layer over all tokens")
    p.add_argument("--grey-view", action="store_true",
                   help="learn shape from grey copies of the images only, for model.vision.grey_view=true "
                        "(colour then cannot stand in for shape)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_pretrain_vision)

    p = sub.add_parser("caption", help="caption images with a stage-2 model")
    p.add_argument("--model", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", default=None, help="user prompt (default: the model's first user prompt)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("chat", help="ask about an image (one --prompt, or interactive)")
    p.add_argument("--model", required=True)
    p.add_argument("image")
    p.add_argument("--prompt", default=None)
    p.add_argument("--system", default=None, help="system prompt (default: the model's first system prompt)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="copy a saved model; --merge-lora folds the adapters into the LLM")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--merge-lora", action="store_true")
    p.add_argument("--format", choices=["qvlm", "transformers"], default="qvlm",
                   help="transformers: a Blip2ForConditionalGeneration folder (transformers, vLLM; docs/export.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a qvlm model from another format's checkpoint")
    isub = p.add_subparsers(dest="format", required=True)
    i = isub.add_parser("blip2", help="a stage-1 model from a transformers BLIP-2 checkpoint (safetensors only)")
    i.add_argument("source", help="hub id or local folder: Blip2ForImageTextRetrieval, Blip2Model or "
                                   "Blip2ForConditionalGeneration")
    i.add_argument("--out", required=True, help="the model folder to write")
    i.add_argument("--overwrite", action="store_true", help="replace --out if it holds something")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_import)

    p = sub.add_parser("score", help="ITC similarity and ITM match probability of every image with every text")
    p.add_argument("--model", required=True, help="a stage-1 model folder (trained or imported)")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help='print {"itc": [[...]], "itm": [[...]]}, rows images')
    p.set_defaults(func=cmd_score)

    from qvlm.serve.schemas import Limits  # stdlib only: the limits' defaults live there

    lim = Limits()
    p = sub.add_parser("serve", help="OpenAI-compatible chat API and a web page for a stage-2 model")
    p.add_argument("--model", required=True, help="a stage-2 model folder (OUT/model of qvlm train)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (the URL is printed)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or set QVLM_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch-size", type=int, default=lim.max_batch_size, help="requests generated together")
    p.add_argument("--max-queue", type=int, default=lim.max_queue,
                   help="requests waiting beyond the batch; more get 429")
    p.add_argument("--max-tokens", type=int, default=lim.max_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=lim.max_prompt_tokens,
                   help="rendered prompt incl. image slots")
    p.add_argument("--max-body-bytes", type=int, default=lim.max_body_bytes)
    p.add_argument("--max-image-bytes", type=int, default=lim.max_image_bytes)
    p.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels,
                   help="width x height, read from the header")
    p.add_argument("--allow-image-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="fetch http(s) image URLs from this host (repeatable; default: data: URLs only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (compiled at start-up)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("checkpoint", help="check a run's checkpoints")
    csub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="CHECKPOINT_COMMAND")
    c = csub.add_parser("verify", help="which checkpoints are intact (file sizes and SHA-256); exit 1 if any is damaged")
    c.add_argument("dir", help="a run folder, its checkpoints/ folder, or one checkpoints/step-N/")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("data", help="make or inspect data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    d = dsub.add_parser("synth", help="write synthetic scenes: DIR/train.jsonl, test.jsonl, heldout.jsonl")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, required=True, help="training images")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--n-test", type=int, default=None)
    d.add_argument("--n-heldout", type=int, default=None)
    d = dsub.add_parser("inspect", help="count records and skip reasons; optional PNG grid")
    d.add_argument("source")
    d.add_argument("--grid", default=None, help="write a PNG grid of sample images here")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_data)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (ConfigError, UsageError, SourceError, DataSourceError) as exc:
        eprint(f"qvlm {args.command}: error: {exc}")
        return 2
    except UnreadableFile as exc:  # a damaged model, checkpoint or image: the file and what is wrong
        if os.environ.get("QVLM_DEBUG"):
            traceback.print_exc()
        eprint(f"qvlm {args.command}: error: {' '.join(str(exc).split())}")  # one line
        return 1
    except KeyboardInterrupt:
        eprint(f"qvlm {args.command}: interrupted")
        return 130
    except Exception as exc:  # runtime failure: one clear line, the traceback on request
        if os.environ.get("QVLM_DEBUG"):
            traceback.print_exc()
        eprint(f"qvlm {args.command}: failed: {type(exc).__name__}: {exc} (set QVLM_DEBUG=1 for the traceback)")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # overrides may come after flags: `qvlm train CFG --out D a.b=c`
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides = list(args.overrides) + extra
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    return run(args.func, args)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
