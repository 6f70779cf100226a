"""Bad input through the CLI, across commands, config files, data files and run
directories: each gives one line `stelab: error: ...` naming the problem, exit
code 2, no traceback, and leaves no partial file behind."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from stelab.cli import main

GOOD = """name = "t"
[data]
name = "digits"
[model]
name = "lenet5"
bits = 2
[train]
epochs = 1
"""


def write(p: Path, text: str) -> str:
    p.write_text(text)
    return str(p)


CASES = [
    # (id, files to create {name: text}, argv with {tmp} placeholders, words in the message)
    ("missing config", {}, ["train", "{tmp}/nope.toml"], ["nope.toml", "does not exist"]),
    ("not toml", {"c.toml": "name = ["}, ["train", "{tmp}/c.toml"], ["c.toml"]),
    ("unknown section", {"c.toml": "[optimm]\nlr = 1\n"}, ["train", "{tmp}/c.toml"], ["optimm"]),
    ("unknown key", {"c.toml": "[optim]\nlrr = 1\n"}, ["train", "{tmp}/c.toml"], ["'lr'"]),
    (
        "wrong type",
        {"c.toml": "[train]\nepochs = 'ten'\n"},
        ["train", "{tmp}/c.toml"],
        ["train.epochs"],
    ),
    ("out of range", {"c.toml": "[optim]\nlr = 0\n"}, ["train", "{tmp}/c.toml"], ["optim.lr"]),
    (
        "bits too large",
        {"c.toml": GOOD},
        ["train", "{tmp}/c.toml", "--set", "model.bits=17"],
        ["model.bits"],
    ),
    (
        "unknown model",
        {"c.toml": GOOD},
        ["train", "{tmp}/c.toml", "--set", "model.name=lenet"],
        ["lenet5"],
    ),
    (
        "unknown dataset",
        {"c.toml": GOOD},
        ["train", "{tmp}/c.toml", "--set", "data.name=digit"],
        ["digits"],
    ),
    (
        "unknown estimator",
        {"c.toml": GOOD},
        ["train", "{tmp}/c.toml", "--set", "model.estimator=clipped_rel"],
        ["clipped_relu"],
    ),
    ("bad --set", {"c.toml": GOOD}, ["train", "{tmp}/c.toml", "--set", "noequals"], ["--set"]),
    ("not a run dir", {}, ["report", "{tmp}"], ["not a stelab run directory"]),
    ("unknown paper", {}, ["reproduce", "yin2020", "--out", "{tmp}/o"], ["yin2019"]),
    (
        "output under a file",
        {"f": ""},
        ["reproduce", "yin2019", "--out", "{tmp}/f/o"],
        ["not writable"],
    ),
    ("disguise unknown", {}, ["disguise", "cosin"], ["cosine"]),
    ("disguise bad step", {}, ["disguise", "cosine", "--step", "-1"], ["step"]),
    ("disguise bad param", {}, ["disguise", "cosine", "-p", "a"], ["--param"]),
    ("disguise degenerate", {}, ["disguise", "cosine", "-p", "a=1.5"], ["cosine"]),
    ("summary shape", {}, ["summary", "lenet5", "--input-shape", "1,2"], ["--input-shape"]),
    ("summary bits", {}, ["summary", "lenet5", "--bits", "-3"], ["bits"]),
    ("estimators plot suffix", {}, ["estimators", "--plot", "{tmp}/p.jpg"], [".png"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(case, tmp_path, capsys):
    _, files, argv, words = case
    for name, text in files.items():
        write(tmp_path / name, text)
    before = {p for p in tmp_path.rglob("*")}
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("stelab: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in out + err
    # nothing half-written: no temp files, and no run directory for a run that never started
    after = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in after if ".tmp" in p.name], after
    assert not [p for p in after if p.name == "checkpoints"], after


def test_corrupt_and_truncated_data_files_name_file_and_checksum(tmp_path, capsys, monkeypatch):
    """A truncated IDX file in the data folder: one line naming the file and the checksum."""
    import stelab.data.files as files

    d = tmp_path / "fashion-mnist"
    d.mkdir()
    names = [r.filename for r in files.RESOURCES["fashion-mnist"].files]
    for n in names:
        with gzip.open(d / n, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + b"\x00" * 10)  # right magic, truncated body
    monkeypatch.setenv("STELAB_DATA", str(tmp_path))
    code = main(["train", write(tmp_path / "c.toml", GOOD), "--set", "data.name=fashion-mnist",
                 "--set", "data.download=false", "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("stelab: error:"), err
    assert any(n in err for n in names) and ("sha256" in err.lower() or "checksum" in err.lower())
