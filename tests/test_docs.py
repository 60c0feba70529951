"""The docs cannot rot: README.md and docs/*.md are checked here, inside ``make test``.

- README.md is at most 150 lines and links every page in docs/; every relative link in README.md
  and docs/*.md points to a file that exists.
- Fenced shell blocks (``bash``, ``sh``, ``shell``) whose info string also says ``runnable``
  (```` ```bash runnable ````: Markdown renderers take the first word of the info string as the
  language, so the block is still highlighted as bash) are executed. The runnable blocks of one page
  run in order, in one fresh temporary directory (so a block may use what an earlier block of the
  same page wrote), each as ``bash -euo pipefail BLOCK``, with the venv's bin first on PATH,
  ``HF_HUB_OFFLINE=1``, and ``QVLM_ROOT`` set to the repository root. Each must exit 0 within
  ``BLOCK_TIMEOUT_S`` seconds.
- Every other shell block starts with a ``# needs: ...`` line (after a ``#!`` line, if it has one)
  that says what it needs that a test machine lacks: the hub, a GPU, a download, a server, minutes.
- The README's demo-results paragraph and the CPU demo table of docs/performance.md agree: one row
  of that table holds every number of the paragraph.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 150
BLOCK_TIMEOUT_S = 300
SHELLS = {"bash", "sh", "shell"}
DEMO_MARKER = "**Latest demo run:**"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: list[str]  # the info string's words: language first
    text: str

    @property
    def where(self) -> str:
        first = next((ln for ln in self.text.splitlines() if ln.strip()), "")
        return f"{self.page.relative_to(ROOT)}:{self.line}: {first.strip()!r}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, body = m.group(1), m.group(2).split(), []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j])
            j += 1
        found.append(Block(page, i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return found


def is_shell(block: Block) -> bool:
    return bool(block.info) and block.info[0].lower() in SHELLS


def runnable(block: Block) -> bool:
    return "runnable" in block.info[1:]


def prose(page: Path) -> str:
    """The page without its fenced blocks (links inside code are not links)."""
    text, out, inside = page.read_text(encoding="utf-8").splitlines(), [], None
    for line in text:
        m = FENCE.match(line)
        if m and inside is None:
            inside = m.group(1)
        elif inside is not None and re.match(rf"^ {{0,3}}{re.escape(inside[0])}{{{len(inside)},}}\s*$", line):
            inside = None
        elif inside is None:
            out.append(line)
    return "\n".join(out)


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


# --------------------------------------------------------------------------------------------
# Structure and links
# --------------------------------------------------------------------------------------------


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert DOCS.is_dir() and list(DOCS.glob("*.md")), "docs/ has no pages"
    assert missing == [], f"README.md does not link these docs pages: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert broken == [], f"{page.relative_to(ROOT)}: links to missing files: {broken}"


# --------------------------------------------------------------------------------------------
# Shell blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_other_shell_block_says_what_it_needs(page):
    bad = []
    for block in blocks(page):
        if "runnable" in block.info[1:] and not is_shell(block):
            bad.append(f"{block.where}: only shell blocks can be runnable (info {' '.join(block.info)!r})")
        if not is_shell(block) or runnable(block):
            continue
        head = block.text.splitlines()
        head = head[1:] if head and head[0].startswith("#!") else head
        if not (head and head[0].startswith("# needs:")):
            bad.append(f"{block.where}: neither runnable nor starting with a '# needs: ...' line")
    assert bad == [], "\n".join(bad)


def test_some_blocks_are_runnable():
    assert sum(runnable(b) for p in PAGES for b in blocks(p) if is_shell(b)) >= 5


def block_env() -> dict[str, str]:
    venv_bin = Path(sys.executable).parent  # not resolved: a venv's python is a link to the base one
    env = dict(os.environ)
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", QVLM_ROOT=str(ROOT))
    return env


RUNNABLE_PAGES = [p for p in PAGES if any(is_shell(b) and runnable(b) for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(page, tmp_path):
    env = block_env()
    for n, block in enumerate(b for b in blocks(page) if is_shell(b) and runnable(b)):
        script = tmp_path / f".block-{n}.sh"
        script.write_text(block.text, encoding="utf-8")
        start = time.perf_counter()
        proc = subprocess.Popen(["bash", "-euo", "pipefail", str(script)], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the block's whole process group, not only bash
            proc.communicate()
            pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s")
        print(f"{block.where}: {time.perf_counter() - start:.1f} s")
        if proc.returncode != 0:
            pytest.fail(f"{block.where}: exit code {proc.returncode}\n--- stdout\n{out[-3000:]}"
                        f"\n--- stderr\n{err[-3000:]}")


# --------------------------------------------------------------------------------------------
# The README's numbers and docs/performance.md agree
# --------------------------------------------------------------------------------------------


def demo_paragraph() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.find(DEMO_MARKER)
    assert start >= 0, f"README.md has no paragraph starting with {DEMO_MARKER}"
    return text[start:].split("\n\n")[0]


def section_rows(page: Path, heading: str) -> list[str]:
    """The table rows (header and separator left out) of the section whose heading starts with ``heading``."""
    section = page.read_text(encoding="utf-8").split(f"\n## {heading}", 1)
    assert len(section) == 2, f"{page.relative_to(ROOT)} has no section '## {heading}'"
    body = section[1].split("\n## ", 1)[0]
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    return [r for r in rows[2:] if not re.match(r"^\|[\s:|-]+\|$", r)]


def test_readme_demo_numbers_match_performance_page():
    wanted = NUMBER.findall(demo_paragraph())
    assert len(wanted) >= 5, wanted
    rows = section_rows(DOCS / "performance.md", "CPU demo")
    assert rows, "docs/performance.md: the CPU demo table has no rows"
    best = max(rows, key=lambda r: sum(n in NUMBER.findall(r) for n in wanted))
    missing = [n for n in wanted if n not in NUMBER.findall(best)]
    assert missing == [], (f"README's demo line and docs/performance.md's CPU demo table disagree: "
                           f"{missing} are in the README but in no single row; closest row:\n{best}")
