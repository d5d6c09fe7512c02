"""The code blocks of the docs, and how the docs test runs them (tests/test_docs.py).

    python tests/docs_blocks.py PAGE.md      # runs PAGE's blocks in the current directory, as the test does

Every ```python and ```bash block of README.md and docs/*.md runs, unless the line right before its opening
fence is ``<!-- docs-test: skip (the reason) -->``. A page's blocks run in order in one Python process, in a
fresh temporary folder that holds links to the repository's top-level entries (so ``configs/...`` and
``tools/...`` resolve, and ``output/`` lands in the temporary folder): like a notebook, a python block sees
the names that the page's earlier python blocks defined. Bash blocks run with ``bash -e`` in the same folder.
A traceback names the page and its line (``File "docs/events.md", line 14``).
"""
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*\S[^)]*)\)\s*-->\s*$")
_ANY_MARKER = re.compile(r"docs-test")


class MarkerError(ValueError):
    """A ``docs-test`` comment that is not a well-formed skip marker right before a python or bash block."""


@dataclass
class Block:
    page: str  # the page's path, as given
    line: int  # the line of the opening fence (1-based)
    language: str  # "python" or "bash"
    source: str
    skip: Optional[str]  # the reason, for a block marked to be skipped

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def extract_blocks(page: str) -> List[Block]:
    """The python and bash blocks of a markdown page, in order.

    Raises:
        MarkerError: a ``docs-test`` comment without a reason, of another form, or not right before a python or
            bash block.
    """
    lines = Path(page).read_text().split("\n")
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if _ANY_MARKER.search(lines[i]):
            nxt = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not _MARKER.match(lines[i]) or nxt is None or nxt.group(2) not in ("python", "bash"):
                raise MarkerError(
                    f"{page}:{i + 1}: {lines[i].strip()!r} is not a skip marker right before a ```python or "
                    "```bash fence; write `<!-- docs-test: skip (the reason) -->` on the line before the fence."
                )
        if fence is None:
            i += 1
            continue
        indent, language = fence.group(1), fence.group(2)
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if language in ("python", "bash"):
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
            marker = _MARKER.match(lines[i - 1]) if i > 0 else None
            blocks.append(Block(page, i + 1, language, "\n".join(body) + "\n", marker.group("reason") if marker else None))
        i = end + 1
    return blocks


def make_workdir(folder: Path) -> Path:
    """Fills ``folder`` with links to the repository's top-level entries (not .git or output)."""
    for entry in REPO.iterdir():
        if entry.name not in (".git", "output") and not (folder / entry.name).exists():
            os.symlink(entry, folder / entry.name)
    return folder


def run_page(page: str) -> int:
    """Runs the page's blocks in order in the current directory; returns 0, or 1 at the first failing block."""
    namespace: dict = {"__name__": "__main__"}
    sys.path.insert(0, str(REPO))
    for block in extract_blocks(page):
        if block.skip is not None:
            print(f"docs-test: skipped {block.where} ({block.skip})", flush=True)
            continue
        print(f"docs-test: running {block.where} ({block.language})", flush=True)
        if block.language == "bash":
            proc = subprocess.run(["bash", "-e", "-c", block.source])
            if proc.returncode != 0:
                print(f"docs-test: FAILED {block.where}: bash exited with {proc.returncode}", flush=True)
                return 1
            continue
        # Blank lines in front, so that line numbers in a traceback are the page's.
        code = compile("\n" * block.line + block.source, block.page, "exec")
        try:
            exec(code, namespace)
        except BaseException:  # noqa: B036 (SystemExit too: a block must not end the page)
            traceback.print_exc()
            print(f"docs-test: FAILED {block.where}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_page(sys.argv[1]))
