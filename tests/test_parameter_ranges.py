"""Every integer parameter check of the core, walked at both ends of its range.

The core checks integer parameters with ``stelab.errors.check_int(name, value, lo, hi)``,
whose error names the parameter, the allowed range and the value. The table below states
each public range as documented, independently of the code; each case calls the public
function just outside both ends (lo - 1 and hi + 1) and with a non-integer, and compares
the whole message, so a bound moved by one (or a check dropped) fails here. The
completeness test scans the core's source for ``check_int`` calls and fails on one that
the table does not walk, so a new check gets its row.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import stelab
from stelab.disguise import equivalent_ste
from stelab.errors import ConfigError
from stelab.halfnormal import halfnormal_alpha, halfnormal_mse, lloyd_alpha
from stelab.nn.convert import auto_step
from stelab.sbn import (
    SBNConv2d,
    SBNLinear,
    all_states,
    exact_expected_loss,
    exact_gradient,
    logistic_loss,
    mc_reference,
    sbn_conv8,
    sbn_mlp,
)
from stelab.sbn import get_estimator as get_sbn_estimator
from stelab.theory.two_layer import coarse_gradient_descent, sample_coarse_grad

SRC = Path(stelab.__file__).resolve().parent
#: the core modules whose checks the table must walk (experiments, the CLI and the
#: analysis commands check their options in their own tests)
CORE = [
    "estimators",
    "quantizers",
    "theory",
    "sbn",
    "disguise",
    "nn",
    "halfnormal.py",
]


def _net() -> Any:
    return sbn_mlp(2, (2,), 1, dtype=torch.float64)


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)


def _v2() -> tuple[list[float], list[float], list[float], list[float]]:
    # v, w, v*, w* of a small two-layer teacher/student pair
    return [1.0, 0.5], [1.0, 0.0], [0.5, 1.0], [0.6, 0.8]


# (module file relative to the package, parameter name as in the error) ->
#   (a call taking the value, lo, hi)
RANGES: dict[tuple[str, str], tuple[Callable[[Any], Any], int, int]] = {
    ("quantizers/quantizer.py", "bits uniform"): (
        lambda b: stelab.Quantizer("uniform", bits=b, step=1.0),
        2,
        16,
    ),
    ("quantizers/quantizer.py", "bits act"): (
        lambda b: stelab.Quantizer("act", bits=b, step=1.0),
        1,
        16,
    ),
    ("theory/two_layer/sampling.py", "batch"): (
        lambda b: sample_coarse_grad(*_v2(), "relu", b),
        1,
        2**62,
    ),
    ("theory/two_layer/dynamics.py", "steps"): (
        lambda s: coarse_gradient_descent(*_v2(), "relu", 0.1, s),
        0,
        10**9,
    ),
    ("theory/two_layer/dynamics.py", "record_every"): (
        lambda r: coarse_gradient_descent(*_v2(), "relu", 0.1, 2, record_every=r),
        1,
        10**9,
    ),
    ("sbn/exact.py", "n"): (all_states, 0, 30),
    ("sbn/exact.py", "max_states exact_expected_loss"): (
        lambda k: exact_expected_loss(_net(), *_xy(), logistic_loss, max_states=k),
        1,
        2**40,
    ),
    ("sbn/exact.py", "max_states exact_gradient"): (
        lambda k: exact_gradient(_net(), *_xy(), logistic_loss, max_states=k),
        1,
        2**40,
    ),
    ("sbn/exact.py", "max_states estimator"): (
        lambda k: get_sbn_estimator("exact", max_states=k),
        1,
        2**40,
    ),
    ("sbn/exact.py", "samples"): (
        lambda s: mc_reference(_net(), *_xy(), logistic_loss, s, 0),
        1,
        2**40,
    ),
    ("sbn/exact.py", "groups"): (
        lambda g: mc_reference(_net(), *_xy(), logistic_loss, 1000, 0, groups=g),
        2,
        2**31,
    ),
    ("sbn/psa.py", "chunk_elements"): (
        lambda c: get_sbn_estimator("psa", chunk_elements=c),
        1,
        2**40,
    ),
    ("sbn/layers.py", "in_features SBNLinear"): (lambda n: SBNLinear(n, 2), 1, 2**31),
    ("sbn/layers.py", "out_features SBNLinear"): (lambda n: SBNLinear(2, n), 1, 2**31),
    ("sbn/layers.py", "in_channels SBNConv2d"): (lambda n: SBNConv2d(n, 2, 3), 1, 2**31),
    ("sbn/layers.py", "out_channels SBNConv2d"): (lambda n: SBNConv2d(2, n, 3), 1, 2**31),
    ("sbn/layers.py", "kernel_size"): (lambda k: SBNConv2d(2, 2, k), 1, 2**31),
    ("sbn/layers.py", "kernel_size pair"): (lambda k: SBNConv2d(2, 2, (3, k)), 1, 2**31),
    ("sbn/layers.py", "stride"): (lambda s: SBNConv2d(2, 2, 3, stride=s), 1, 2**31),
    ("sbn/layers.py", "padding SBNConv2d"): (lambda p: SBNConv2d(2, 2, 3, padding=p), 0, 2**31),
    ("sbn/layers.py", "samples sample_outputs"): (
        lambda s: _net().sample_outputs(_xy()[0], samples=s),
        1,
        2**31 - 1,
    ),
    ("sbn/layers.py", "samples surrogate_loss"): (
        lambda s: _net().surrogate_loss(*_xy(), logistic_loss, samples=s),
        1,
        2**31 - 1,
    ),
    ("sbn/layers.py", "in_features sbn_mlp"): (lambda n: sbn_mlp(n, (2,), 1), 1, 2**31),
    ("sbn/layers.py", "hidden[0]"): (lambda n: sbn_mlp(2, (n,), 1), 1, 2**31),
    ("sbn/layers.py", "out_features sbn_mlp"): (lambda n: sbn_mlp(2, (2,), n), 1, 2**31),
    ("sbn/layers.py", "in_channels sbn_conv8"): (
        lambda n: sbn_conv8(in_channels=n, input_size=8, channels=(2, 2)),
        1,
        2**31,
    ),
    ("sbn/layers.py", "input_size"): (
        lambda n: sbn_conv8(in_channels=1, input_size=n, channels=(2, 2)),
        1,
        2**31,
    ),
    ("sbn/layers.py", "channels[0]"): (
        lambda n: sbn_conv8(in_channels=1, input_size=8, channels=(n, 2)),
        1,
        2**31,
    ),
    ("sbn/layers.py", "padding sbn_conv8"): (
        lambda p: sbn_conv8(in_channels=1, input_size=8, channels=(2, 2), padding=p),
        0,
        16,
    ),
    ("sbn/layers.py", "num_classes"): (
        lambda n: sbn_conv8(in_channels=1, input_size=8, channels=(2, 2), padding=1, num_classes=n),
        1,
        2**31,
    ),
    ("disguise/derive.py", "bits"): (
        lambda b: equivalent_ste("cosine", 1.0, bits=b),
        2,
        16,
    ),
    ("nn/convert.py", "bits"): (lambda b: auto_step(torch.ones(3), "uniform", b), 2, 16),
    ("halfnormal.py", "bits halfnormal_mse"): (lambda b: halfnormal_mse(1.0, b), 1, 16),
    ("halfnormal.py", "bits halfnormal_alpha"): (halfnormal_alpha, 1, 16),
    ("halfnormal.py", "bits lloyd_alpha"): (lloyd_alpha, 1, 16),
}


def _param(key: tuple[str, str]) -> str:
    """The parameter name as the error spells it (the row name's first word)."""
    return key[1].split()[0]


@pytest.mark.parametrize("key", list(RANGES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_each_end_of_the_range_is_refused_naming_the_range(key):
    call, lo, hi = RANGES[key]
    name = re.escape(_param(key))
    for bad in (lo - 1, hi + 1, lo + 0.5):
        msg = rf"^{name} must be an integer in \[{lo}, {hi}\], got {re.escape(repr(bad))}$"
        with pytest.raises(ConfigError, match=msg):
            call(bad)


def _int_value(node: ast.expr) -> int | None:
    """A bound written as a constant expression (``2**31 - 1``), else None."""
    try:
        value = eval(compile(ast.Expression(node), "<bound>", "eval"), {"__builtins__": {}})
    except Exception:
        return None
    return value if isinstance(value, int) else None


def _scanned() -> dict[tuple[str, str], set[tuple[int | None, int | None]]]:
    """(file, parameter name) -> the (lo, hi) of every check_int call in the core."""
    out: dict[tuple[str, str], set[tuple[int | None, int | None]]] = {}
    files: list[Path] = []
    for entry in CORE:
        p = SRC / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for path in files:
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "check_int"
            ):
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant):
                name = first.value
            elif isinstance(first, ast.JoinedStr):  # f"hidden[{i}]": the first element
                name = ast.unparse(first)[2:-1].replace("{i}", "0")
            else:  # a helper passing its own ``name`` (sbn.layers._pair)
                name = "<helper>"
            literal = len(node.args) == 4  # not ``*kind.bits_range``
            bounds = (
                (_int_value(node.args[2]), _int_value(node.args[3])) if literal else (None, None)
            )
            out.setdefault((rel, name), set()).add(bounds)
    return out


def test_every_core_check_int_is_walked():
    """Every (file, name) of a check_int call in the core has a row in RANGES, with the
    same literal bounds (rows whose bounds come from elsewhere, e.g. a kind's
    ``bits_range`` or the helper ``_pair``, are walked through their public callers)."""
    walked: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for key, (_, lo, hi) in RANGES.items():
        walked.setdefault((key[0], _param(key)), set()).add((lo, hi))
    scanned = _scanned()
    missing = sorted(k for k in scanned if k not in walked and k[1] != "<helper>")
    assert not missing, f"check_int calls without a row in RANGES: {missing}"
    for key, bounds in scanned.items():
        literal = {b for b in bounds if None not in b}
        if key[1] != "<helper>" and literal:
            assert literal <= walked[key], (key, literal, walked[key])
    # the helper's callers: kernel_size, stride and padding of SBNConv2d
    assert ("sbn/layers.py", "<helper>") in scanned
    for name in ("kernel_size", "stride", "padding"):
        assert ("sbn/layers.py", name) in walked
