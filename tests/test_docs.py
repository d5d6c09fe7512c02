"""The docs run: every ```python and ```bash block of README.md and docs/*.md (see tests/docs_blocks.py).

A block that must not run carries ``<!-- docs-test: skip (the reason) -->`` on the line before its fence;
each such block shows up as a skipped test with its reason (``pytest -rs``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_blocks import REPO, MarkerError, extract_blocks, make_workdir

PAGES = ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def _blocks(page):
    try:
        blocks = extract_blocks(str(REPO / page))
    except MarkerError:
        return []  # test_every_docs_test_marker_is_well_formed names it
    for block in blocks:
        block.page = page  # named from the repository root
    return blocks


def run_page(page, workdir, timeout=300):
    """Runs ``tests/docs_blocks.py page`` in ``workdir`` (a fresh folder linked to the repository)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the docs' runs use the store in their OUTPUT_DIR
    make_workdir(workdir)
    return subprocess.run([sys.executable, str(REPO / "tests" / "docs_blocks.py"), page], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.skip is None for b in _blocks(p))])
def test_docs_page_runs(page, tmp_path):
    proc = run_page(page, tmp_path)
    assert proc.returncode == 0, f"{page}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("where, reason", [(b.where, b.skip) for p in PAGES for b in _blocks(p) if b.skip is not None])
def test_docs_block_marked_to_skip(where, reason):
    pytest.skip(f"{where}: {reason}")


def test_every_docs_test_marker_is_well_formed():
    for page in PAGES:
        extract_blocks(str(REPO / page))  # raises MarkerError naming the page and line


# ---- the extractor and the runner, on pages made here --------------------------------------------------------
PAGE = """# A page

```python
x = 40
```

Text, and a block in another language, which does not run:

```yaml
x: 1
```

<!-- docs-test: skip (needs 2 processes) -->
```python
raise RuntimeError("a skipped block must not run")
```

```python
print("x is", x + 2)
```

```bash
test -f configs/digits/mlp.yaml && echo bash ran
```
"""


def test_blocks_of_a_page_run_in_order_share_names_and_skip_the_marked_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    blocks = extract_blocks(str(page))
    assert [(b.line, b.language, b.skip) for b in blocks] == [
        (3, "python", None), (14, "python", "needs 2 processes"), (18, "python", None), (22, "bash", None)
    ]
    (tmp_path / "work").mkdir()
    proc = run_page(str(page), tmp_path / "work")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "x is 42\n" in out and "bash ran\n" in out and out.index("x is 42") < out.index("bash ran")
    assert f"docs-test: skipped {page}:14 (needs 2 processes)" in proc.stdout


@pytest.mark.parametrize(
    "broken, error",
    [
        ("```python\nimport trainkit\ntrainkit.no_such_function()\n```\n", "AttributeError"),
        ("```bash\ntrue\nfalse\necho not reached\n```\n", "bash exited with 1"),
    ],
)
def test_a_broken_block_fails_its_page_and_names_the_line(tmp_path, broken, error):
    page = tmp_path / "page.md"
    page.write_text(PAGE + "\nA broken block:\n\n" + broken)
    line = PAGE.count("\n") + 4
    (tmp_path / "work").mkdir()
    proc = run_page(str(page), tmp_path / "work")
    assert proc.returncode == 1
    assert f"docs-test: FAILED {page}:{line}" in proc.stdout and error in proc.stdout + proc.stderr
    assert "not reached" not in proc.stdout
    if "python" in broken:  # the traceback points into the page, at the line of the call
        assert f'File "{page}", line {line + 2}' in proc.stderr


@pytest.mark.parametrize(
    "marker", ["<!-- docs-test: skip -->", "<!-- docs-test: skip () -->", "<!-- docs-test: run (why) -->"]
)
def test_a_marker_without_a_reason_or_of_another_form_is_an_error(tmp_path, marker):
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n{marker}\n```python\nx = 1\n```\n")
    with pytest.raises(MarkerError, match=rf"page.md:3: .*skip \(the reason\)"):
        extract_blocks(str(page))


def test_a_marker_that_is_not_right_before_a_block_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n<!-- docs-test: skip (why) -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(MarkerError, match="page.md:3"):
        extract_blocks(str(page))
