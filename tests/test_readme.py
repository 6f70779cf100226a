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


#: what README.md says ``mymod.py`` holds: a ``build()`` returning a quantized model
MYMOD = """\
from torch import nn

import stelab


def build():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return stelab.quantize(net, activations={"fn": "act", "bits": 2, "alpha": 0.49})
"""


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_your_own_model_shell_commands_run_as_written(tmp_path, monkeypatch):
    """Every ``stelab ...`` line of the "Your own model" section's shell block, in a folder
    with the repository's configs/ and a ``mymod.py`` as the README describes it."""
    import shlex
    import shutil

    from stelab.cli import main

    sec = _section(README.read_text(encoding="utf-8"), "Your own model")
    (block,) = re.findall(r"^```bash[ \t]*\n(.*?)^```", sec, re.M | re.S)
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands and all(c.startswith("stelab ") for c in commands), commands
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "mymod.py").write_text(MYMOD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("STELAB_IMPORT", "")  # --import exports to it: restored afterwards
    for c in commands:
        assert main(shlex.split(c)[1:]) == 0, c
    assert (tmp_path / "gc" / "descent.png").stat().st_size > 0
    assert (tmp_path / "lenet5-digits.onnx").stat().st_size > 0
