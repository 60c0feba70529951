"""The package's shape: the layer contract covers every child of ``qvlm``, module names are unique,
functions stay short, and the lines of code stay under the budget."""

from __future__ import annotations

import ast
import io
import pkgutil
import re
import tokenize
from pathlib import Path

import qvlm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(qvlm.__file__).resolve().parent
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}  # the argparse builder: one flat list of flags
MAX_CODE_LINES = 7950  # 7,300 after the simplification (#25); then import blip2 and score (#29), the
# transformers export (#30), conversations and VQA (#31)


def contract_layers() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"layers = \[(.*?)\]", text, re.S).group(1)
    return re.findall(r'"([^"]+)"', block)


def test_the_layer_contract_names_every_child_of_the_package():
    named = {m.strip() for layer in contract_layers() for m in re.split(r"[|:]", layer)}
    children = {f"qvlm.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert named == children, (sorted(children - named), sorted(named - children))
    assert len(contract_layers()) == 7


def test_no_two_modules_share_a_name():
    names = [p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"]
    names += [p.name for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").is_file()]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_sixty_lines():
    long = [(str(p.relative_to(PACKAGE)), name, n) for p in sorted(PACKAGE.rglob("*.py"))
            for name, n in function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert [x for x in long if x[:2] not in LONG_FUNCTIONS_ALLOWED] == []


def code_lines(source: str) -> int:
    """Non-blank lines holding code: comments, blank lines and docstrings (of modules, classes and
    functions) are not counted."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def test_code_lines_counts_code_only():
    source = '"""doc\nstring"""\n\n# comment\nx = 1  # trailing\n\ndef f():\n    """doc"""\n    return (1,\n            2)\n'
    assert code_lines(source) == 4  # x = 1, def, and the two lines of the return


def test_lines_of_code_stay_within_the_budget():
    total = sum(code_lines(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py"))
    print(f"lines of code in src/qvlm: {total}")
    assert total <= MAX_CODE_LINES
