"""`stelab gradcheck --model MODULE:FACTORY`, zoo deterministic nets, --checkpoint errors,
and user code through --import / STELAB_IMPORT in every command."""

from __future__ import annotations

import json
import pickle
import re
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET = textwrap.dedent(
    """
    import torch
    from torch import nn
    import stelab

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            wq = stelab.Quantizer("uniform", "ste", bits=4, step=0.05)
            self.conv1 = stelab.QuantConv2d(c, c, 3, padding=1, bias=False, weight_quantizer=wq)
            self.bn1 = nn.BatchNorm2d(c)
            self.act1 = stelab.QuantAct("act", "ste", bits=2, alpha=0.5)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.act2 = stelab.QuantAct("act", "ste", bits=2, alpha=0.5)

        def forward(self, x):
            return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return ResNet()

    def build_with_data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 8, 8, generator=g)
        return build(), (x, torch.randint(0, 10, (64,), generator=g))

    def not_a_model():
        return 42

    def sbn_toy():
        from stelab import data, sbn
        x, y = data.load("psa-toy", dtype=torch.float64).train
        torch.manual_seed(0)
        return sbn.sbn_mlp(2, (5, 5, 5), 1, dtype=torch.float64), x, y
    """
)

ESTS = textwrap.dedent(
    """
    import math
    import torch
    import stelab

    @stelab.register_estimator("{name}", overwrite=True)
    def tri(x):
        "max(0, 1 - |x|)"
        return (1 - x.abs()).clamp_min(0)

    def bump(r):
        return 1 + 0.3 * torch.cos(2 * math.pi * r)
    """
)


@pytest.fixture()
def main(monkeypatch):
    from stelab import cli

    monkeypatch.setenv("STELAB_IMPORT", "")  # --import exports to it: restored after the test
    return cli.main


@pytest.fixture()
def usercode(tmp_path, monkeypatch):
    """A folder with the user's modules, as the current directory (fresh module names)."""
    tag = tmp_path.name.replace("-", "_").replace(".", "_")
    (tmp_path / f"mynet_{tag}.py").write_text(RESNET)
    (tmp_path / f"myests_{tag}.py").write_text(ESTS.format(name="tri_user"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from stelab import estimators

    estimators.REGISTRY.unregister("tri_user")  # only the --import below may register it
    yield tmp_path, f"mynet_{tag}", f"myests_{tag}", "tri_user"
    estimators.REGISTRY.unregister("tri_user")
    for m in (f"mynet_{tag}", f"myests_{tag}"):
        sys.modules.pop(m, None)


def _one_line_error(capsys, code, pattern):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("stelab: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def test_user_resnet_factory_prints_tables_and_writes_figures(main, usercode, capsys):
    tmp, net, ests, tri = usercode
    out = tmp / "out"
    code = main(
        [
            "gradcheck",
            "--model",
            f"{net}:build",
            "--import",
            ests,
            "--estimators",
            f"ste,clipped_relu,dsq,ewgs,{tri}",
            "--batches",
            "3",
            "--batch-size",
            "16",
            "--etas",
            "0.01,0.1",
            "--examples",
            "200",
            "--reference-samples",
            "40",
            "--out",
            str(out),
        ]
    )
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "P(loss decreases)" in text and "held-out" in text
    assert "bias against the gradient of the stochastic relaxation" in text
    assert "stochastic rounding" in text  # the relaxation is stated
    for name in ("ste", "clipped_relu", "dsq(k=3.0)", "ewgs(delta=0.2)", tri):
        assert name in text
    for f in ("descent.png", "descent_change.png", "bias.png", "results.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "deterministic" and res["where"] == "activations"
    assert "blocks.0.conv1" in res["layers"]


def test_factory_with_its_own_batch_and_checkpoint(main, usercode, capsys, tmp_path):
    _, net, _, _ = usercode
    import importlib

    mod = importlib.import_module(net)
    model = mod.build()
    with torch.no_grad():
        model.fc.bias.fill_(7.0)
    ckpt = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "o2"
    code = main(
        ["gradcheck", "--model", f"{net}:build_with_data", "--checkpoint", str(ckpt),
         "--estimators", "ste", "--batches", "2", "--batch-size", "16", "--etas", "0.1",
         "--reference-samples", "20", "--out", str(out)]
    )  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "the factory's batch, 64 examples" in text
    # a model whose checkpoint does not fit is one line
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    code = main(["gradcheck", "--model", f"{net}:build", "--checkpoint", str(bad)])
    _one_line_error(capsys, code, r"--checkpoint '.*bad\.pt' does not fit --model")


@pytest.mark.parametrize("model", ["toy", "lenet5"])
@pytest.mark.parametrize("kind", ["garbage", "empty", "raw-pickle", "directory", "list"])
def test_bad_checkpoint_is_one_line_exit_2(main, capsys, tmp_path, model, kind):
    path = tmp_path / "ck.pt"
    if kind == "garbage":
        path.write_bytes(b"\x80\x04not a checkpoint at all")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps({"w": pickle.PickleError("x")}))
    elif kind == "directory":
        path.mkdir()
    else:
        torch.save([torch.zeros(1)], path)
    code = main(["gradcheck", "--model", model, "--checkpoint", str(path)])
    want = {
        "directory": "does not exist as a file",
        "list": "holds a list, not a state dict",
    }.get(kind, "is not a PyTorch state dict loadable")
    _one_line_error(capsys, code, rf"--checkpoint '{re.escape(str(path))}' {want}")


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--model", "lenet"], r"unknown gradcheck model .*'lenet'.*did you mean 'lenet5'"),
        (["--model", "lenet5", "--etas", "0.1,-1"], r"--etas must be numbers > 0, got '-1'"),
        (["--model", "lenet5", "--where", "both"], "where must be 'auto'"),
        (["--model", "lenet5", "--estimators", "ste,clipped_rel"], "did you mean 'clipped_relu'"),
        (["--model", "lenet5", "--batches", "0"], "--batches must be an integer"),
        (["--model", "lenet5", "--estimators", "approx_sign"], "cannot serve quantizer 'act'"),
        (["--model", "nosuchmod_xyz:build"], "--model 'nosuchmod_xyz': cannot import it"),
        (["--model", "a:b:c"], "--model must be MODULE:NAME"),
    ],
)
def test_gradcheck_deterministic_bad_input(main, capsys, args, pattern):
    _one_line_error(capsys, main(["gradcheck", *args]), pattern)


def test_factory_returning_junk_is_an_error(main, usercode, capsys):
    _, net, _, _ = usercode
    code = main(["gradcheck", "--model", f"{net}:not_a_model"])
    _one_line_error(capsys, code, "returned a int, not an nn.Module")
    code = main(["gradcheck", "--model", f"{net}:nothing_here"])
    _one_line_error(capsys, code, "has no attribute 'nothing_here'")


def test_lenet5_zoo_runs(main, capsys, tmp_path):
    code = main(
        ["gradcheck", "--model", "lenet5", "--estimators", "ste,clipped_relu", "--batches", "2",
         "--etas", "0.1", "--reference-samples", "20", "--examples", "300"]
    )  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "--model lenet5 (--bits 2) on digits, 300 examples" in text
    assert "classifier.7" in text


# --------------------------------------------------------------------------- --import


def test_import_makes_user_estimators_visible_everywhere(main, usercode, capsys, monkeypatch):
    from stelab import estimators

    tmp, _, ests, tri = usercode
    assert main(["estimators"]) == 0
    assert tri not in capsys.readouterr().out
    # after the command name, before it, and via STELAB_IMPORT
    for argv in (["estimators", "--import", ests], [f"--import={ests}", "estimators"]):
        assert main(argv) == 0
        assert tri in capsys.readouterr().out
    import os

    assert os.environ["STELAB_IMPORT"] == ests  # exported once, for worker processes
    sys.modules.pop(ests)
    estimators.REGISTRY.unregister(tri)
    monkeypatch.setenv("STELAB_IMPORT", ests)
    assert main(["estimators", "--plot", str(tmp / "e.png")]) == 0
    assert tri in capsys.readouterr().out and (tmp / "e.png").is_file()
    # the summary of a zoo model with the user's estimator
    assert main(["summary", "lenet5", "--bits", "2", "--estimator", tri]) == 0
    assert tri in capsys.readouterr().out


def test_disguise_param_takes_a_callable_and_names(main, usercode, capsys):
    _, _, ests, _ = usercode
    code = main(["disguise", "periodic", "-p", f"func={ests}:bump", "--step", "0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # alpha of q' = 1 + 0.3 cos(2 pi r): harmonic mean sqrt(1 - 0.3^2)
    m = re.search(r"α = ([0-9.]+)", out)
    assert m and float(m.group(1)) == pytest.approx((1 - 0.09) ** 0.5, rel=1e-6)
    code = main(["disguise", "periodic", "-p", "func=nosuch_mod_q:bump"])
    _one_line_error(capsys, code, "'nosuch_mod_q': cannot import it: ModuleNotFoundError")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--import", "nosuch_mod_zz", "estimators"], "--import 'nosuch_mod_zz': cannot import"),
        (["estimators", "--import", "not-a-module"], "--import must name a Python module"),
    ],
)
def test_import_failure_is_one_line(main, capsys, argv, pattern):
    _one_line_error(capsys, main(argv), pattern)


def test_import_env_failure_is_one_line(main, capsys, monkeypatch):
    monkeypatch.setenv("STELAB_IMPORT", "nosuch_env_mod")
    _one_line_error(capsys, main(["estimators"]), "STELAB_IMPORT 'nosuch_env_mod': cannot import")


def test_factory_sbn_goes_to_the_sbn_report(main, usercode, capsys):
    _, net, _, _ = usercode
    code = main(
        ["gradcheck", "--model", f"{net}:sbn_toy", "--estimators", "psa,det:ste", "--draws",
         "20", "--sample-sizes", "1,2", "--no-timing"]
    )  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "layer 3" in text and "exact enumeration" in text and "det:ste" in text


def test_sbn_gradcheck_reports_each_estimator_as_it_finishes(main, usercode, capsys):
    """Not on a terminal (capsys): one progress line per estimator, in the order given,
    before the tables (so a long run is never silent)."""
    _, net, _, _ = usercode
    code = main(
        ["gradcheck", "--model", f"{net}:sbn_toy", "--estimators", "psa,dst", "--draws",
         "20", "--sample-sizes", "1,2", "--no-timing"]
    )  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    lines = text.splitlines()
    progress = [i for i, ln in enumerate(lines) if ln.startswith(("  psa", "  dst"))]
    assert [lines[i].split(":")[0].strip() for i in progress] == ["psa", "dst"]
    assert max(progress) < next(i for i, ln in enumerate(lines) if "layer" in ln)
