"""The CIFAR-10 code paths end to end on a tiny generated CIFAR-10 (small, CPU, ~20 s).

The fixture is the real binary release: ``cifar-10-binary.tar.gz`` holding
``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin`` and
``batches.meta.txt`` (records of one label byte + 3072 pixel bytes, R then G then B
planes), its SHA-256 put in the resource table, and ``$STELAB_DATA`` pointing at its
folder. Each path then loads it (verify + extract), augments (flip + crop), trains one
epoch and writes its report section: [Y19] Table 1's VGG-11 / ResNet-20 rows and the
[S20] SBN training with its ``cifar10`` preset scaled down.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stelab import data
from stelab.data.files import RemoteFile, Resource
from stelab.errors import ConfigError
from stelab.experiments.psa2020 import training as psa
from stelab.experiments.yin2019 import table1_cifar as y19c

PER_BATCH, N_TEST, VAL = 8, 10, 10  # 40 training records, 30 after the validation carve-out


def _records(x: np.ndarray, y: np.ndarray) -> bytes:
    return b"".join(bytes([int(lab)]) + img.tobytes() for img, lab in zip(x, y, strict=True))


def make_cifar_archive(seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A CIFAR-10 binary release with 5 × PER_BATCH training and N_TEST test records;
    returns (archive bytes, test images (N, 3, 32, 32) uint8, test labels)."""
    rng = np.random.default_rng(seed)
    n = 5 * PER_BATCH
    x = rng.integers(0, 256, (n + N_TEST, 3, 32, 32), dtype=np.uint8)
    y = np.arange(n + N_TEST, dtype=np.uint8) % 10
    members = {
        f"data_batch_{i + 1}.bin": _records(
            x[i * PER_BATCH : (i + 1) * PER_BATCH], y[i * PER_BATCH : (i + 1) * PER_BATCH]
        )
        for i in range(5)
    }
    members["test_batch.bin"] = _records(x[n:], y[n:])
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    members["batches.meta.txt"] = ("\n".join(names) + "\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, body in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{fname}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue(), x[n:], y[n:]


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding only the archive; $STELAB_DATA points at it, the cache is private,
    and the resource table carries the archive's checksum."""
    archive, test_x, test_y = make_cifar_archive()
    root = tmp_path / "cifar-data"
    root.mkdir()
    (root / "cifar-10-binary.tar.gz").write_bytes(archive)
    res = Resource(
        "cifar10",
        ("http://127.0.0.1:9/unused/",),  # never used: download=False everywhere below
        (
            RemoteFile(
                "archive", "cifar-10-binary.tar.gz", hashlib.sha256(archive).hexdigest(),
                len(archive),
            ),
        ),
    )  # fmt: skip
    monkeypatch.setitem(data.RESOURCES, "cifar10", res)
    monkeypatch.setenv("STELAB_DATA", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STELAB_MIRROR", raising=False)
    ds = data.load("cifar10", download=False, val_size=VAL, standardize=False, progress=False)
    # the archive was verified and extracted next to it; the test split is the file's records
    assert (root / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert torch.equal(ds.test.x, torch.from_numpy(test_x).float() / 255)
    assert ds.test.y.tolist() == test_y.tolist()
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5 * PER_BATCH - VAL, VAL, N_TEST)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def test_yin2019_cifar_rows_run_end_to_end(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "table1-cifar10"
    r = y19c.run(
        out,
        progress=False,
        threads=1,
        overrides={
            "epochs": 1,
            "milestones": (),
            "batch_size": 16,
            "val_size": VAL,
            "bits": (2,),
            "estimators": ("ste", "clipped_relu"),
        },  # fmt: skip
        net_overrides={"vgg11": {"width": 0.125}, "resnet20": {"width": 4}},
    )
    assert r.skipped is None
    report = (out / "report.md").read_text()
    for net, label in (("vgg11", "VGG-11"), ("resnet20", "ResNet-20")):
        assert f"# [Y19] Table 1: the three STEs on {label} (full)" in report
        assert f"]({net}/table1_curves.png)" in report
        assert (out / net / "table1_curves.png").is_file()
        runs = out / net / "runs"
        dirs = [runs / f"{net}-float"] + [runs / f"{net}-a2-{e}" for e in ("ste", "clipped_relu")]
        for d in dirs:
            m = json.loads((d / "metrics.json").read_text())
            assert m["epochs"] == 1 and math.isfinite(m["final_train_loss"])
            assert 0.0 <= m["test_acc"] <= 1.0
            cfg = (d / "config.toml").read_text()
            assert 'name = "cifar10"' in cfg and 'augment = "flip_crop"' in cfg
            env = json.loads((d / "env.json").read_text())
            assert str(cifar_root / "cifar-10-batches-bin") in env["data_source"]
            log = (d / "train.log").read_text()
            assert f"({5 * PER_BATCH - VAL} train / {VAL} val / {N_TEST} test)" in log
        assert len(y19c.t1.read_history(dirs[-1])) == 1
    ids = {c.id for c in r.claims}
    assert json.loads((out / "results.json").read_text())["claims"] == [
        c.to_dict() for c in r.claims
    ]
    # CIFAR-10 without a row limit: the absolute comparison with the paper is made too
    assert ids == {f"{n} {c}" for n in ("vgg11", "resnet20") for c in ("ste-order", "absolute")}
    # the section on running it for real: the exact command and the estimated GPU time
    assert "## Running the CIFAR-10 rows" in report and y19c.COMMAND in report
    lo, hi = y19c.gpu_estimate_hours("vgg11")
    assert f"VGG-11 {lo:.1f}-{hi:.1f} h" in report
    with pytest.raises(ConfigError, match="alexnet"):
        y19c.run(out, progress=False, net_overrides={"alexnet": {}})


def test_yin2019_cifar_part_is_skipped_without_cifar(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STELAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    r = y19c.run(tmp_path / "out", progress=False)
    if r.skipped is None:  # CIFAR-10 found in a system directory of this machine
        pytest.fail("CIFAR-10 unexpectedly found; the skip path was not exercised")
    assert r.claims == [] and "CIFAR-10 is not available" in r.skipped
    assert "d.download('cifar10')" in r.skipped
    assert y19c.run(tmp_path / "out", quick=True).skipped.startswith("quick mode")


def test_gpu_estimate_matches_the_stated_arithmetic() -> None:
    # VGG-11: 7 runs x 200 epochs x (6 x 45000 + 2 x 15000) image-MACs x 152769536 MACs
    flop = 7 * 200 * 300_000 * 152_769_536
    assert flop == pytest.approx(6.4163e16, rel=1e-4)
    lo, hi = y19c.gpu_estimate_hours("vgg11")
    assert lo == pytest.approx(1.3 * flop / 20e12 / 3600)  # compute-bound at 20 TFLOP/s
    assert hi == pytest.approx(1.3 * flop / 10e12 / 3600)
    # ResNet-20 is launch-bound: 7 x 200 x ceil(45000 / 128) = 492800 steps of 5 ms
    lo, hi = y19c.gpu_estimate_hours("resnet20")
    assert lo == hi == pytest.approx(1.3 * 492_800 * 0.005 / 3600)


def test_psa2020_cifar10_preset_runs_end_to_end(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "psa-cifar10"
    small = {
        "channels": (4, 8), "epochs": 1, "batch_size": 16, "val_size": VAL,
        "eval_samples": 2, "init_rows": 16, "device": "cpu",
    }  # fmt: skip
    r = psa.run(out, progress=False, preset="cifar10", overrides=small)
    res = json.loads((out / "results.json").read_text())
    base = res["base_config"]
    assert base["dataset"] == "cifar10" and base["augment"] is True and base["padding"] == 0
    assert base["channels"] == [4, 8] and base["schedule"] == "cosine"
    assert (res["val_rows"], res["test_rows"]) == (VAL, N_TEST)
    assert set(res["runs"]) == set(psa.ESTIMATORS)
    for spec, run in res["runs"].items():
        assert run["train_rows"] == 5 * PER_BATCH - VAL
        assert len(run["history"]) == 1 and run["steps"] == math.ceil((5 * PER_BATCH - VAL) / 16)
        assert 0.0 <= run["test"]["acc_avg"] <= 1.0, spec
    report = (out / "report.md").read_text()
    assert "on cifar10 (30 training rows" in report
    assert "## Running the paper's CIFAR-10 configuration" in report
    assert psa.CIFAR10_COMMAND in report
    assert r.claims and (out / "training_curves.png").is_file()
    with pytest.raises(ConfigError, match="chanels"):
        psa.run(out, progress=False, preset="cifar10", overrides={"chanels": (4, 8)})
    with pytest.raises(ConfigError, match="preset"):
        psa.run(out, progress=False, preset="imagenet")
