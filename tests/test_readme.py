"""The README's Python works as written: every ```python block of README.md is run, in
order, in one namespace, in a fresh interpreter (as a user pasting them would), and the
2-bit training example reaches the accuracy the README recommends.

The README changes over time; these tests read it each run, so a new block is tested
the moment it is added.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: What "Which estimator should I use?" recommends, as numbers this example must meet:
#: clipped ReLU at least this test accuracy, and at least the identity STE's.
MIN_CLIPPED_RELU_ACC = 0.93

# runs blocks (a JSON list on stdin) in one namespace; a failure names the block
DRIVER = """\
import json, sys
blocks = json.load(sys.stdin)
ns = {"__name__": "__main__"}
for i, (line, src) in enumerate(blocks):
    exec(compile("\\n" * (line - 1) + src, "README.md", "exec"), ns)
if "acc" in ns:
    print("ACC=" + json.dumps(ns["acc"]))
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Every fenced ```python block as (first line number in the file, source)."""
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        out.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return out


def _run(blocks: list[tuple[int, str]], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_python_blocks_are_found_with_their_line_numbers():
    text = "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = x + 1\n")]


def test_every_readme_python_block_runs_in_order(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    r = _run(blocks, tmp_path)
    assert r.returncode == 0, f"a README.md python block failed:\n{r.stderr[-3000:]}"


def test_readme_training_example_reaches_the_recommended_accuracy(tmp_path):
    own = [
        b for b in python_blocks(README.read_text(encoding="utf-8")) if "def train_2bit(" in b[1]
    ]
    assert own, "README.md has no block defining train_2bit (the quick start's 2-bit example)"
    r = _run(own, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("ACC="))
    acc = json.loads(line[4:])
    assert acc["clipped_relu"] >= MIN_CLIPPED_RELU_ACC, acc
    assert acc["clipped_relu"] >= acc["ste"], acc
