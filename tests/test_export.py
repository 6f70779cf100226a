"""Quantized ONNX export, checked by running the files in onnxruntime.

Truth is stelab's own eval-mode forward. To make the comparison independent of
summation order (onnxruntime's and torch's convolutions add in different orders,
and one ulp at a bin edge moves a quantized activation by a whole step), the zoo
models also get a *dyadic* version: weights, biases, batch-norm statistics and
steps on power-of-two grids and inputs on a 1/16 grid, so every sum is exact in
float32 and many inputs of the quantizers sit exactly on bin edges. Those must
match to 1e-5 (they match bit for bit); Gaussian inputs are checked as well.
The quantizer-level test feeds each quantizer its bin edges, ties, clip limits
and their float neighbours, and checks closed forms for the dyadic steps.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import stelab.export as E  # noqa: E402
from stelab import QuantAct, QuantConv2d, Quantizer, QuantLinear, halfnormal_alpha, models  # noqa: E402
from stelab.cli import main  # noqa: E402
from stelab.errors import ConfigError, StelabTypeError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


def _grid(gen: torch.Generator, shape, lo: int, hi: int, denom: float) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen).float() / denom


def _dyadic(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Every weight, bias and batch-norm statistic on a power-of-two grid (see the
    module docstring); batch-norm eps 0 and variances 4^k make 1/std a power of two."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = 0.0
                m.running_mean.copy_(_grid(gen, m.running_mean.shape, -8, 8, 16))
                m.running_var.copy_(4.0 ** torch.randint(-1, 2, m.running_var.shape, generator=gen))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(_grid(gen, m.weight.shape, -16, 16, 16))
                if m.bias is not None:
                    m.bias.copy_(_grid(gen, m.bias.shape, -8, 8, 16))
    return model.eval()


def _zoo(name: str, shape) -> nn.Module:
    # 2-bit [Y19] activations with α = 1/2, 4-bit weights with step 1/8 (codes clip at -8, 7)
    m = models.build(
        name,
        in_shape=shape,
        act={"bits": 2, "alpha": 0.5},
        weights={"fn": "uniform", "bits": 4, "step": 0.125},
    )
    return _dyadic(m, torch.Generator().manual_seed(1))


def _stelab(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _n(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _n_quantized_weights(model: nn.Module) -> int:
    return sum(
        isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer is not None
        for m in model.modules()
    )


@pytest.fixture(scope="module", params=[("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def zoo_export(request, tmp_path_factory):
    name, shape = request.param
    model = _zoo(name, shape)
    x = _grid(torch.Generator().manual_seed(2), (2, *shape), -32, 32, 16)
    path = E.export(model, x, tmp_path_factory.mktemp(name) / f"{name}.onnx")
    return name, shape, model, path


def test_zoo_round_trip_exact_on_dyadic_inputs(zoo_export):
    name, shape, model, path = zoo_export
    x = _grid(torch.Generator().manual_seed(3), (64, *shape), -32, 32, 16)  # another batch size
    # how many inputs of the activation quantizers sit exactly on a jump k·α (0 <= k <= 2)
    edges = []

    def count(mod, inp):
        u = inp[0] / 0.5
        edges.append(int(((u == u.round()) & (u >= 0) & (u <= 2)).sum()))

    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, QuantAct)]
    ref = _stelab(model, x)
    for h in hooks:
        h.remove()
    out = E.run_onnx(path, x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL
    assert min(edges) >= 10, f"{name}: too few inputs on bin edges: {edges}"


def test_zoo_round_trip_on_gaussian_inputs(zoo_export):
    name, shape, model, path = zoo_export
    x = torch.randn((8, *shape), generator=torch.Generator().manual_seed(4))
    ref = _stelab(model, x)
    assert (E.run_onnx(path, x) - ref).abs().max().item() <= TOL


def test_zoo_file_holds_qdq_pairs_and_int8_weights(zoo_export):
    name, shape, model, path = zoo_export
    ops = _ops(path)
    acts = _n(model, QuantAct)
    weights = _n_quantized_weights(model)
    assert acts > 0 and weights > 0
    assert ops["QuantizeLinear"] == acts
    assert ops["DequantizeLinear"] == acts + weights
    # no float quantizer arithmetic left besides the Div/Ceil of the act quantizers
    assert "Round" not in ops and ops.get("Div", 0) == acts and ops.get("Mul", 0) == 0
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    codes = {k: v for k, v in inits.items() if k.endswith("dq.codes")}
    assert len(codes) == weights
    for k, v in codes.items():
        assert v.dtype == np.int8, k
        assert v.min() >= -8 and v.max() <= 7, k  # 4 bits: a clipped range of int8
    for m in model.modules():  # every float weight of a quantized layer left the file
        if isinstance(m, (QuantLinear, QuantConv2d)):
            w = m.weight.detach().numpy()
            assert not any(v.shape == w.shape and v.dtype == np.float32 for v in inits.values())


def test_exported_size_matches_the_file(zoo_export):
    name, shape, model, path = zoo_export
    size = E.exported_size(model)
    proto = onnx.load(str(path))
    arrays = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    names = [i.name for i in proto.graph.initializer]
    code_bytes = sum(a.nbytes for a, n in zip(arrays, names, strict=True) if n.endswith("codes"))
    assert size.integer_weight_bytes == code_bytes
    assert size.quantized_weights == _n_quantized_weights(model)
    total = sum(a.nbytes for a in arrays)
    # + zero points, clip bounds, batch norms' unit scales (LeNet-5: 2.7%)
    assert 0 <= total - size.exported_bytes <= 0.03 * total
    assert size.compression > 3.5  # int8 codes for (nearly) all parameters


def test_float_size_is_the_parameter_count_of_lenet5():
    """float_bytes against LeNet-5's parameter count in closed form (28x28 input)."""
    size = E.exported_size(_zoo("lenet5", (1, 28, 28)))
    weights = 6 * 25 + 16 * 6 * 25 + 120 * 400 + 84 * 120 + 10 * 84
    biases = 6 + 16 + 120 + 84 + 10
    bn_stats = 2 * (6 + 16 + 120 + 84)
    steps = 4 + 5  # 4 activation quantizers, 5 weight quantizers
    assert size.float_bytes == 4 * (weights + biases + bn_stats + steps)
    # int8 codes + float32 scale + int8 zero point per weight tensor replace them
    assert size.integer_weight_bytes == weights
    assert size.exported_bytes == size.float_bytes - 4 * weights - 4 * 5 + weights + 5 * (4 + 1)


def _lsq_trained(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """A few SGD steps on a random target so the learned (LSQ) steps move off their init."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((16, *shape), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        out = model(x)
        loss = ((out - torch.randn(out.shape, generator=gen)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _mixed_model() -> nn.Module:
    """Per-channel steps (weights and activations), learned steps, every forward
    function, 2..16 bits, an unclipped quantizer, a float layer, an input quantizer."""
    torch.manual_seed(0)
    c = 4
    return nn.Sequential(
        QuantConv2d(3, c, 3, padding=1, padding_mode="reflect",
                    weight_quantizer=Quantizer("uniform", bits=4, step=torch.rand(c, 1, 1, 1) * 0.1 + 0.05)),  # noqa: E501
        QuantAct("act", bits=3, alpha=torch.rand(1, c, 1, 1) + 0.2),
        QuantConv2d(c, c, 3, padding=1, weight_quantizer=Quantizer("sign"),
                    input_quantizer=Quantizer("uniform", bits=3, step=0.3, learn_step=True)),
        QuantAct("uniform", bits=8, step=0.05, learn_step=True),
        QuantConv2d(c, c, 1, weight_quantizer=Quantizer("ternary", threshold=0.3)),
        QuantAct("uniform", bits=12, step=torch.rand(1, c, 1, 1) * 0.01 + 0.001),
        QuantConv2d(c, c, 1, weight_quantizer=Quantizer("uniform", bits=None, step=0.01)),
        QuantAct("act", bits=10, alpha=0.01, learn_step=True),
        QuantConv2d(c, c, 1, weight_quantizer=Quantizer("heaviside")),
        QuantAct("ternary", "ste", threshold=0.7),
        nn.Conv2d(c, c, 1),
        QuantAct("sign", "ste"),  # identity STEs: the gradient reaches every LSQ step
        nn.Flatten(),
        QuantLinear(c * 8 * 8, 5, weight_quantizer=Quantizer("act", bits=2, alpha=0.05)),
        QuantAct("heaviside", "ste"),
        QuantLinear(5, 6, weight_quantizer=Quantizer(
            "uniform", bits=5, step=torch.rand(6, 1) * 0.1 + 0.05, learn_step=True)),
        QuantAct("uniform", bits=None, step=0.1),
        QuantAct("identity"),
    )  # fmt: skip


def test_per_channel_and_learned_steps_round_trip(tmp_path):
    model = _mixed_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("step")}
    model = _lsq_trained(model, (3, 8, 8))
    moved = [n for n, p in model.named_parameters() if n in init and not torch.equal(p, init[n])]
    assert len(moved) == len(init) == 4  # the learned steps are not their initial values
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    path = E(model, x, tmp_path / "mixed.onnx")  # the module is callable: stelab.export(...)
    for batch, scale in ((9, 1.0), (9, 3.0), (1, 0.3)):
        xb = scale * torch.randn((batch, 3, 8, 8), generator=torch.Generator().manual_seed(batch))
        assert (E.run_onnx(path, xb) - _stelab(model, xb)).abs().max().item() <= TOL
    ops = _ops(path)
    assert ops["QuantizeLinear"] == 5  # act 3, input uniform 3, uniform 8, 12, act 10 bits
    assert ops["DequantizeLinear"] == 5 + 7
    assert ops["Shrink"] == 1 and ops["Where"] == 1 and ops["Round"] == 1
    types = {
        i.name: onnx.helper.tensor_dtype_to_np_dtype(i.data_type)
        for i in onnx.load(str(path)).graph.initializer
    }
    assert types["0.dq.codes"] == np.int8 and types["0.dq.scale"] == np.float32
    assert types["13.dq.codes"] == np.uint8  # act weights: unsigned
    # activation codes unsigned: 12-bit uniform as uint16 with zero point 2^15
    assert types["5.zero_point_q"] == np.uint16 and types["7.zero_point_q"] == np.uint16
    assert types["2.input_quantizer.lo_q"] == np.uint8  # 3 bits: Clip of uint8 codes
    assert types["6.dq.codes"] in (np.int8, np.int16, np.int32)  # unclipped: by range
    per_channel = onnx.numpy_helper.to_array(
        next(i for i in onnx.load(str(path)).graph.initializer if i.name == "0.dq.scale")
    )
    assert per_channel.shape == (4,)


# --- every quantizer at its bin edges, ties and clip limits ------------------------

_EDGE_QUANTIZERS = [
    ("uniform", dict(bits=3, step=0.25)),  # dyadic: exact ties k + 1/2
    ("uniform", dict(bits=2, step=0.1)),
    ("uniform", dict(bits=8, step=0.05)),  # int8 range: QuantizeLinear saturates alone
    ("uniform", dict(bits=12, step=0.001)),  # int16, clipped as int32
    ("uniform", dict(bits=16, step=1e-4)),
    ("uniform", dict(bits=None, step=0.25)),
    ("uniform", dict(bits=4, step=torch.tensor([0.125, 0.3, 0.07]))),  # per channel
    ("act", dict(bits=2, alpha=0.5)),  # dyadic: x = kα exactly
    ("act", dict(bits=1, alpha=0.7)),
    ("act", dict(bits=2, alpha=halfnormal_alpha(2))),
    ("act", dict(bits=8, alpha=0.01)),
    ("act", dict(bits=10, alpha=0.003)),
    ("act", dict(bits=4, alpha=torch.tensor([0.5, 0.21, 1.3]))),  # per channel
    ("sign", {}),
    ("heaviside", {}),
    ("ternary", dict(threshold=0.4)),
]


def _edge_points(q: Quantizer) -> torch.Tensor:
    """(rows, 3) float32 inputs: for a step Δ (per column), k·Δ and (k + 1/2)·Δ for k
    around 0 and both clip limits, their float neighbours, ±0 and ±1e6."""
    if q.fwd.has_step:
        step = q.step.detach().double().reshape(-1).expand(3)
        lo, hi = q.fwd.qrange
        lo, hi = (-40, 40) if not math.isfinite(lo) else (int(lo), int(hi))
        ks = sorted({*range(lo - 2, lo + 3), *range(-2, 3), *range(hi - 2, hi + 3)})
        base = torch.tensor([k + f for k in ks for f in (0.0, 0.5)], dtype=torch.float64)
        x = (base[:, None] * step[None, :]).float()
    else:
        t = q.fwd.threshold
        x = torch.tensor([0.0, t, -t, 1.0, -1.0, 1e-30, -1e-30])[:, None].expand(-1, 3).float()
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    extra = torch.tensor([[0.0], [-0.0], [1e6], [-1e6]]).expand(-1, 3)
    return torch.cat([x, extra])


class _Parallel(nn.Module):
    """Quantizer j applied to channel j of an (N, J, 3) input."""

    def __init__(self, qs):
        super().__init__()
        self.qs = nn.ModuleList(qs)

    def forward(self, x):
        return torch.stack([q(x[:, j]) for j, q in enumerate(self.qs)], 1)


def test_every_quantizer_bit_exact_at_edges(tmp_path):
    qs = [QuantAct(fn, **kw) for fn, kw in _EDGE_QUANTIZERS]
    points = [_edge_points(q) for q in qs]
    rows = max(len(p) for p in points)
    x = torch.stack([p[torch.arange(rows) % len(p)] for p in points], 1)  # (rows, J, 3)
    model = _Parallel(qs).eval()
    path = E.export(model, x, tmp_path / "edges.onnx")
    ref = _stelab(model, x)
    out = E.run_onnx(path, x)
    for j, (fn, kw) in enumerate(_EDGE_QUANTIZERS):
        assert torch.equal(out[:, j], ref[:, j]), (
            f"{fn} {kw}: {(out[:, j] - ref[:, j]).abs().max()}"
        )
    # closed forms (float64, exact for these dyadic steps): ties to even, ceil at jumps
    xs = x[:, 0].double()
    want = 0.25 * torch.clamp(torch.round(xs / 0.25), -4, 3)
    assert torch.equal(out[:, 0].double(), want)
    assert out[:, 0].double().eq(0.5).any() and xs.eq(0.625).any()  # round(2.5) = 2
    xa = x[:, 7].double()
    assert torch.equal(out[:, 7].double(), 0.5 * torch.clamp(torch.ceil(xa / 0.5), 0, 3))
    assert ops_ok(path)


def ops_ok(path) -> bool:
    ops = _ops(path)
    # clipped uniform/act quantizers: one QuantizeLinear/DequantizeLinear pair each
    n_qdq = sum(
        fn in ("uniform", "act") and kw.get("bits") is not None for fn, kw in _EDGE_QUANTIZERS
    )
    return ops["QuantizeLinear"] == n_qdq == ops["DequantizeLinear"]


# --- the model is left alone; bad input ---------------------------------------------


def test_export_leaves_the_model_unchanged(tmp_path):
    model = _mixed_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    E.export(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__module__.startswith(("stelab.nn", "stelab.quantizers", "torch"))
               for m in model.modules())  # fmt: skip


def test_bad_input_is_named(tmp_path):
    x = torch.randn(2, 4)
    lin = QuantLinear(4, 3, weight_quantizer=Quantizer("uniform", bits=4, step=0.1))
    with pytest.raises(ConfigError, match="stochastic"):
        stoch = Quantizer("uniform", bits=4, step=0.1, rounding="stochastic")
        E.export(nn.Sequential(nn.Linear(4, 4), stoch), x, tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="varies along 2 axes"):
        q = QuantAct("uniform", bits=4, step=torch.rand(3, 4) + 0.1)
        E.export(nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 4)), q), x, tmp_path / "b.onnx")
    with pytest.raises(ConfigError, match="float32"):
        E.export(lin, x.double(), tmp_path / "c.onnx")
    with pytest.raises(StelabTypeError, match="example_input"):
        E.export(lin, [[1.0] * 4], tmp_path / "c.onnx")
    with pytest.raises(StelabTypeError, match="model"):
        E.export("lenet5", x, tmp_path / "c.onnx")
    with pytest.raises(ConfigError, match="is a directory"):
        E.export(lin, x, tmp_path)
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"user data")
    with pytest.raises(ConfigError, match="overwrite=True"):
        E.export(lin, x, kept)
    assert kept.read_bytes() == b"user data"
    assert E.export(lin, x, kept, overwrite=True) == kept
    assert (E.run_onnx(kept, x) - _stelab(lin, x)).abs().max().item() <= TOL
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_missing_dependency_is_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails
    with pytest.raises(E.ExportDependencyError, match=r"pip install stelab\[export\]"):
        E.export(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.onnx")
    assert main(["export", "--model", "lenet5", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stelab: error:") and "stelab[export]" in err[0]
    assert not (tmp_path / "m.onnx").exists()


# --- the CLI ---------------------------------------------------------------------------


def test_cli_exports_a_zoo_model(tmp_path, capsys):
    out = tmp_path / "lenet.onnx"
    argv = ["export", "--model", "lenet5", "--bits", "2", "--weight-bits", "4", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: 4 QuantizeLinear, 9 DequantizeLinear" in text
    err = float(text.rsplit("max |difference| = ", 1)[1].split()[0])
    assert err <= TOL
    assert _ops(out)["QuantizeLinear"] == 4
    before = out.read_bytes()
    assert main(argv) == 2  # exists: kept
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_exports_a_trained_run(tmp_path, capsys):
    from train_helpers import quick_cfg

    from stelab.train import load_model, train

    run = tmp_path / "run"
    cfg = quick_cfg(
        "train.epochs=1",
        "model.weights={fn='uniform', bits=4, step='auto', learn_step=true}",
    )
    train(cfg, run, progress=False)
    assert main(["export", str(run), "--no-verify"]) == 0
    path = run / "model.onnx"
    assert f"wrote {path}" in capsys.readouterr().out
    model = load_model(run)
    x = torch.randn((16, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    assert (E.run_onnx(path, x) - _stelab(model, x)).abs().max().item() <= TOL
    assert _ops(path)["DequantizeLinear"] == 4 + 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export"], "either a run folder"),
        (["export", "RUN", "--model", "lenet5"], "either a run folder"),
        (["export", "RUN", "--bits", "2"], "--bits only apply with --model"),
        (["export", "--model", "lenet5", "--out", "m.pt"], "--out must be a .onnx file"),
        (["export", "--model", "lenet", "--out", "m.onnx"], "unknown model 'lenet'"),
        (["export", "--model", "lenet5", "--input-shape", "1,28", "--out", "m.onnx"], "C,H,W"),
        (["export", "missing_run"], "does not exist"),
    ],
)
def test_cli_bad_input_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RUN").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stelab: error:") and message in err[0], err
    assert not list(tmp_path.glob("*.onnx"))
