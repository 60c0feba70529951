"""The ``qvlm`` command line. ``main(argv) -> int``; see DESIGN.md §7 for the contract.

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
from typing import Callable, Sequence

from qvlm.config import ConfigError, dump_config, load_config
from qvlm.sources import SourceError


class UsageError(Exception):
    """A bad flag or argument combination (exit code 2)."""


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=float))


# ---- commands ---------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """End-to-end smoke: build every block from the config, run one image through the VLM,
    and let the LLM answer a text question. A stand-in for ``qvlm demo`` until it lands."""
    from qvlm.smoke import run_smoke

    cfg = load_config(args.config, args.overrides)
    report = run_smoke(cfg, prompt=args.prompt)
    if args.json:
        print_json(report)
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


# ---- parser -----------------------------------------------------------------------------------


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (deltas over the defaults)")
    p.add_argument("overrides", nargs="*", help="overrides like train.lr=3e-4 model.qformer.num_queries=16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvlm", description="Build, train, evaluate and serve a BLIP-2-style VLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config as YAML")
    add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("smoke", help="build every block from a config and run one forward + one LLM answer")
    add_config_args(p)
    p.add_argument("--prompt", default="What is the capital of France?", help="text-only question for the LLM")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_smoke)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (ConfigError, UsageError, SourceError) as exc:
        eprint(f"qvlm {args.command}: error: {exc}")
        return 2
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
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    return run(args.func, args)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
