"""The experiments' shared vocabulary: claims, part results, the cache and the writer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stelab.errors import ConfigError
from stelab.experiments import reproduce
from stelab.experiments.spine import Claim, PartResult, cached, jsonable, ladder, write_part


@pytest.mark.parametrize(
    ("full", "weak", "want"),
    [
        (True, True, "reproduced"),
        (True, False, "reproduced"),
        (False, True, "partly"),
        (False, False, "not"),
    ],
)
def test_ladder(full: bool, weak: bool, want: str) -> None:
    assert ladder(reproduced=full, partly=weak) == want


def test_claim_refuses_unknown_verdict_and_round_trips() -> None:
    with pytest.raises(ConfigError, match="'maybe'"):
        Claim("a", "t", "maybe", "e")
    c = Claim("a", "text", "partly", "ev", {"z": 1.5, "ok": True})
    assert Claim.from_dict(c.to_dict()) == c
    assert "checks" not in Claim("b", "t", "not", "e").to_dict()


def test_jsonable() -> None:
    d = jsonable({"t": torch.tensor([1.0, 2.0]), "n": math.nan, 3: (1, "x"), "s": torch.tensor(4)})
    assert d == {"t": [1.0, 2.0], "n": None, "3": [1, "x"], "s": 4}
    json.dumps(d)


def test_write_part_writes_results_and_report(tmp_path) -> None:
    claims = [Claim("a", "t", "reproduced", "e")]
    r = write_part(
        tmp_path,
        name="p",
        claims=claims,
        results={"x": torch.tensor(1.0)},
        report="# p\n",
        figures=["f.png"],
        started=0.0,
    )
    assert isinstance(r, PartResult) and r.seconds > 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["x"] == 1.0 and res["claims"][0]["verdict"] == "reproduced"
    assert (tmp_path / "report.md").read_text() == "# p\n"
    d = r.to_dict()
    assert d["claims"] == [claims[0].to_dict()] and d["figures"] == [str(tmp_path / "f.png")]


def test_cached_reuses_only_a_matching_key(tmp_path) -> None:
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"v": len(calls)}

    p = tmp_path / "c" / "x.json"
    assert cached(p, {"k": 1}, compute) == ({"v": 1}, False)
    assert cached(p, {"k": 1}, compute) == ({"v": 1}, True)
    assert cached(p, {"k": 2}, compute) == ({"v": 2}, False)  # another key: recomputed
    p.write_text("{not json")
    assert cached(p, {"k": 2}, compute) == ({"v": 3}, False)  # corrupt: recomputed
    assert len(calls) == 3


def test_every_paper_package_is_registered_once() -> None:
    assert list(reproduce.PAPERS) == list(reproduce.PAPER_PACKAGES)
    for paper in reproduce.PAPERS.values():
        assert paper["parts"] and paper["title"]


def test_register_paper_adds_a_paper_and_refuses_junk(monkeypatch) -> None:
    from stelab.experiments.spine import Paper

    monkeypatch.setattr(reproduce, "PAPERS", dict(reproduce.PAPERS))
    reproduce.register_paper(Paper("mine", "My paper", {"a": "tests.fake_part"}))
    assert reproduce.PAPERS["mine"] == {"title": "My paper", "parts": {"a": "tests.fake_part"}}
    with pytest.raises(ConfigError, match="has no parts"):
        reproduce.register_paper(Paper("empty", "E", {}))
    with pytest.raises(ConfigError, match="must be a"):
        reproduce.register_paper(42)  # type: ignore[arg-type]


def test_part_dir_checks_the_path_and_the_seed_and_creates_the_folder(tmp_path) -> None:
    from stelab.errors import StelabTypeError
    from stelab.experiments.spine import part_dir

    out, seed = part_dir(str(tmp_path / "a" / "b"), 7, seed_max=10)
    assert out == tmp_path / "a" / "b" and out.is_dir() and seed == 7
    assert part_dir(out, 10, seed_max=10)[1] == 10  # the limit itself is allowed
    with pytest.raises(ConfigError, match=r"seed .*\[0, 10\], got 11"):
        part_dir(out, 11, seed_max=10)
    with pytest.raises(ConfigError, match="seed"):
        part_dir(out, -1)
    with pytest.raises(StelabTypeError, match="out_dir must be a path, got 42"):
        part_dir(42, 0)
