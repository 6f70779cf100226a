"""The mutation runner (scripts/mutate.py) on a toy package: the mutants it proposes, what
it must not touch, that a mutant changes only a copy, and that a caught and a surviving
mutant are told apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("stelab_mutate", ROOT / "scripts" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["stelab_mutate"] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["stelab_mutate"]


TOY = '''"""Toy module: the docstring 1.5 < 2 is never mutated."""

import logging

LOG = logging.getLogger(__name__)


def clip(x: float, hi: float = 2.5) -> float:
    """Docstring of clip."""
    if x > hi:
        LOG.warning("clipped %s at %s", x, 0.5)
        return hi
    return x + 0.0


def check(x):
    if x < 0 and x != -1:
        raise ValueError(f"x must be >= 0, got {x * 2}")
    save(x)
    return -x


def save(x):
    pass


def __repr__(self):
    return 7 + 1
'''


def _collect(mutate, source, funcs=None):
    return mutate._Collector("toy", "src/toy.py", source, funcs).run()


def test_operators_proposed_and_never_in_docstrings_messages_or_annotations(mutate):
    ms = _collect(mutate, TOY)
    out = {(m.op, mutate.apply(TOY, m).splitlines()[m.line - 1].strip()) for m in ms}
    assert ("cmp-negate", "if x <= hi:") in out
    assert ("cmp-boundary", "if x >= hi:") in out
    assert ("const", "def clip(x: float, hi: float=2.575) -> float:") not in out
    assert any(op == "const" and "2.575" in line for op, line in out)  # default 2.5 * 1.03
    assert ("drop-term", "return x") in out
    assert ("arith-swap", "return x - 0.0") in out
    assert ("boolop", "if x < 0 or x != -1:") in out
    assert ("unary-drop", "return x") in out
    assert ("return-none", "return None") in out
    assert ("del-stmt", "pass") in out
    for m in ms:
        assert m.line not in (1, 9), m  # docstrings
        assert m.line != 11 and m.line != 18, m  # logging call, raise (messages)
        assert m.line < 26, m  # __repr__
    # annotations are never mutated: `float` stays on every mutated def line
    assert all("x: float" in mutate.apply(TOY, m) for m in ms)


def test_function_filter_limits_the_candidates(mutate):
    ms = _collect(mutate, TOY, ["check"])
    assert ms and all(17 <= m.line <= 20 for m in ms)


def test_apply_changes_the_span_only_and_the_result_parses(mutate):
    import ast

    for m in _collect(mutate, TOY):
        new = mutate.apply(TOY, m)
        ast.parse(new)
        a, b = TOY.splitlines(), new.splitlines()
        assert len(a) == len(b)
        diff = [i + 1 for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        assert diff == [m.line], m


TOY_SRC = "def add(a, b):\n    return a + b\n\n\ndef unused(a):\n    return a * 2\n"


def _toy_tree(mutate, root):
    """A toy repository: src/toy.py (add, tested; unused, not) and tests/test_toy.py;
    the source's mutants."""
    (root / "src").mkdir()
    (root / "tests").mkdir()
    (root / "src" / "toy.py").write_text(TOY_SRC)
    (root / "tests" / "test_toy.py").write_text(
        "from toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    )
    return mutate._Collector("toy", "src/toy.py", TOY_SRC, None).run()


def test_run_mutant_mutates_a_copy_and_classifies(mutate, tmp_path):
    ms = _toy_tree(mutate, tmp_path)
    caught = next(m for m in ms if m.op == "arith-swap" and m.line == 2)
    survivor = next(m for m in ms if m.op == "arith-swap" and m.line == 6)
    tests = ["tests/test_toy.py"]
    assert mutate.run_mutant(caught, tests, 60, root=tmp_path).status == "caught"
    assert mutate.run_mutant(survivor, tests, 60, root=tmp_path).status == "survived"
    assert (tmp_path / "src" / "toy.py").read_text() == TOY_SRC  # the real tree is untouched


def test_uncovered_lists_the_mutants_no_test_executes(mutate, tmp_path):
    ms = _toy_tree(mutate, tmp_path)
    never, tail = mutate.uncovered(ms, ["tests/test_toy.py"], root=tmp_path)
    assert "1 passed" in tail
    assert {m.line for m in never} == {6} and {m.line for m in ms} == {2, 6}
    assert len(never) == sum(m.line == 6 for m in ms)


def test_a_mutant_from_an_older_source_is_stale(mutate, tmp_path):
    """--rerun skips a mutant whose line reads differently now (a rename: the recorded
    replacement would reintroduce the old name) or whose file is gone."""
    (tmp_path / "src").mkdir()
    src = "def add(a, b):\n    return a + b\n"
    path = tmp_path / "src" / "toy.py"
    path.write_text(src)
    m = next(
        m for m in mutate._Collector("toy", "src/toy.py", src, None).run() if m.op == "arith-swap"
    )
    mutate._describe(m, tmp_path)
    assert (m.old_line, m.new_line) == ("return a + b", "return a - b")
    assert not mutate.is_stale(m, tmp_path)
    path.write_text("def add(a, c):\n    return a + c\n")
    assert mutate.is_stale(m, tmp_path)
    path.unlink()
    assert mutate.is_stale(m, tmp_path)


def test_report_section_is_replaced_between_markers(mutate, tmp_path):
    doc = tmp_path / "testing.md"
    doc.write_text("# Testing\n\nintro\n")
    mutate.write_report(doc, "first\n")
    mutate.write_report(doc, "second\n")
    text = doc.read_text()
    assert text.startswith("# Testing\n\nintro\n")
    assert "second" in text and "first" not in text and text.count(mutate.BEGIN) == 1


def test_every_area_has_sources_and_tests(mutate):
    for area in mutate.AREAS:
        assert mutate._tests(area), area
        assert any(mutate._sources(s) for s in mutate.AREAS[area]["sources"]), area
