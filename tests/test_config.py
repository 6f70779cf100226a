"""Tests of stelab.config: validation errors, --set overrides, TOML round trip."""

from __future__ import annotations

import pytest
import tomllib

from stelab.config import (
    TrainConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
    parse_override,
)
from stelab.errors import ConfigError, StelabTypeError


def test_defaults_are_valid_and_documented_values():
    cfg = parse_config({})
    assert cfg == TrainConfig()
    assert cfg.data.name == "digits" and cfg.model.name == "lenet5" and cfg.model.bits is None
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9
    assert cfg.schedule.name == "constant" and cfg.train.epochs == 10 and cfg.train.devices == 1


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"optim": {"lrr": 0.1}}, r"unknown key 'lrr' in section \[optim\].*did you mean 'lr'"),
        ({"trian": {}}, r"unknown top-level key or section 'trian'.*did you mean 'train'"),
        ({"model": {"estimater": "ste"}}, r"\[model\].*did you mean 'estimator'"),
        ({"data": {"batchsize": 3}}, r"\[data\].*did you mean 'batch_size'"),
    ],
)
def test_unknown_keys_name_section_and_closest(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"optim": {"lr": "0.1"}}, r"optim\.lr must be a number, got '0\.1' \(str\)"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs must be an integer, got 2\.5"),
        ({"train": {"deterministic": 1}}, r"train\.deterministic must be true or false"),
        ({"schedule": {"milestones": 20}}, r"schedule\.milestones must be a list"),
        ({"optim": {"betas": [0.9]}}, r"optim\.betas must be a list of two numbers"),
        ({"model": {"bits": "two"}}, r"model\.bits must be an integer in \[1, 16\]"),
        ({"optim": "sgd"}, r"\[optim\] must be a table"),
    ],
)
def test_wrong_types(raw, pattern):
    with pytest.raises(StelabTypeError, match=pattern):
        parse_config(raw)


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"optim": {"lr": 0}}, r"optim\.lr must be a finite number > 0, got 0"),
        ({"optim": {"lr": -0.1}}, r"optim\.lr must be a finite number > 0"),
        ({"optim": {"lr": float("nan")}}, r"optim\.lr must be a finite number"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be an integer >= 1, got 0"),
        ({"model": {"bits": 0}}, r"model\.bits must be an integer in \[1, 16\], got 0"),
        ({"model": {"bits": 17}}, r"model\.bits must be an integer in \[1, 16\], got 17"),
        ({"optim": {"momentum": 1.0}}, r"optim\.momentum must be .*< 1"),
        ({"schedule": {"name": "multistep", "milestones": [40, 20]}}, "strictly increasing"),
        ({"schedule": {"name": "multistep"}}, "at least one epoch"),
        ({"optim": {"name": "adam", "nesterov": True}}, r"nesterov = true needs optim\.name"),
        ({"data": {"batch_size": 63}, "train": {"devices": 2}}, "divisible by train.devices"),
        ({"model": {"name": "lenet5", "width": 2}}, "lenet5' has no width option"),
        ({"train": {"grad_clip": 0}}, r"train\.grad_clip must be a finite number > 0"),
    ],
)
def test_out_of_range(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


@pytest.mark.parametrize(
    "raw, pattern",
    [
        (
            {"model": {"name": "lenet"}},
            r"model\.name: unknown model 'lenet'.*did you mean 'lenet5'",
        ),
        ({"data": {"name": "fashion_mnst"}}, r"data\.name: unknown dataset.*'fashion-mnist'"),
        (
            {"model": {"estimator": "clipped_rel"}},
            r"model\.estimator: unknown estimator 'clipped_rel'.*did you mean 'clipped_relu'",
        ),
        ({"optim": {"name": "adamm"}}, r"optim\.name: unknown optimizer 'adamm'.*'adam'"),
        ({"schedule": {"name": "cosin"}}, r"schedule\.name: unknown schedule.*'cosine'"),
        ({"model": {"weights": "sgn:ste"}}, r"model\.weights.*unknown quantizer 'sgn'.*'sign'"),
        ({"data": {"augment": "flip"}}, r"data\.augment: unknown augmentation 'flip'"),
        (
            {"model": {"estimator": "swish_sign", "estimator_params": {"bta": 5}}},
            r"model\.estimator_params: .*unexpected parameters \['bta'\]",
        ),
    ],
)
def test_unknown_names_with_closest_match(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


def test_parse_override_values():
    assert parse_override("optim.lr=0.01") == (["optim", "lr"], 0.01)
    assert parse_override("model.bits=4") == (["model", "bits"], 4)
    assert parse_override("train.deterministic=true") == (["train", "deterministic"], True)
    assert parse_override("schedule.milestones=[20, 40]") == (["schedule", "milestones"], [20, 40])
    assert parse_override("data.name=digits") == (["data", "name"], "digits")  # bare string
    assert parse_override("model.weights=sign:ste") == (["model", "weights"], "sign:ste")
    assert parse_override('name="a b"') == (["name"], "a b")
    assert parse_override("model.weights={fn='uniform', bits=4}") == (
        ["model", "weights"],
        {"fn": "uniform", "bits": 4},
    )
    assert parse_override(" optim.lr = 1e-3 ") == (["optim", "lr"], 0.001)
    for bad in ("optim.lr", "=3", "optim..lr=1", "optim lr=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def test_overrides_apply_and_validate_like_file_values(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[optim]\nlr = 0.1\n[model]\nbits = 2\nestimator = "swish_sign"\n')
    cfg = load_config(f, ["optim.lr=0.01", "model.bits=4", "model.estimator_params.beta=5"])
    assert cfg.optim.lr == 0.01 and cfg.model.bits == 4 and cfg.model.estimator == "swish_sign"
    assert cfg.model.estimator_params == {"beta": 5}
    with pytest.raises(ConfigError, match=r"c\.toml with --set optim\.lrr=1.*did you mean 'lr'"):
        load_config(f, ["optim.lrr=1"])
    with pytest.raises(StelabTypeError, match=r"optim\.lr must be a number, got 'fast'"):
        load_config(f, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.lr is a value, not a table"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])
    assert load_config(f, ["model.bits=float"]).model.bits is None


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML.*line 1"):
        load_config(bad)


def test_dump_round_trip():
    cfg = parse_config(
        {
            "name": 'quote " and ü',
            "data": {"name": "digits", "limit": 100, "augment": "crop", "val_size": 50},
            "model": {
                "name": "vgg11",
                "bits": 4,
                "estimator": "swish_sign",
                "estimator_params": {"beta": 7.5},
                "alpha": 0.25,
                "weights": {"fn": "uniform", "bits": 4, "step": "auto", "estimator": "ste"},
                "width": 0.5,
            },
            "optim": {"name": "adamw", "lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-10},
            "schedule": {"name": "multistep", "milestones": [3, 7], "gamma": 0.3},
            "train": {"epochs": 9, "seed": 12, "grad_clip": 1000.0, "init_from": "runs/x"},
        }
    )
    text = dump_config(cfg)
    back = parse_config(tomllib.loads(text))
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert dump_config(back) == text
    # string weight specs and defaults round-trip too
    simple = parse_config({"model": {"weights": "sign:approx_sign"}})
    assert parse_config(tomllib.loads(dump_config(simple))) == simple
    assert parse_config(tomllib.loads(dump_config(TrainConfig()))) == TrainConfig()


def test_example_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.name == f.stem
    y19 = load_config(root / "lenet5-fashion-y19.toml")
    # docs/papers/yin2019.md, deep-network table, LeNet-5 row
    assert (y19.train.epochs, y19.data.batch_size, y19.optim.lr) == (50, 64, 0.1)
    assert (y19.schedule.name, y19.schedule.milestones, y19.schedule.gamma) == (
        "multistep",
        (20, 40),
        0.1,
    )
    assert y19.optim.momentum == 0.9 and y19.model.bits == 2 and y19.train.init_from


# --- whatever is accepted can be written and read back (run folders must resume) ----------

CONTROL = "".join(chr(c) for c in [*range(0x20), 0x7F])


@pytest.mark.parametrize("text", [CONTROL, "a\x7fb", "\U0001f600 \u00e9 \U00010348", 'q"\\'])
def test_strings_with_control_and_non_bmp_characters_round_trip(text, tmp_path):
    cfg = load_config(None, ["model.name='lenet5'"])
    cfg = parse_config({**config_to_dict(cfg), "name": text, "data": {"data_dir": text}})
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    back = load_config(path)  # tomllib is the independent reader
    assert back == cfg and back.name == text and back.data.data_dir == text


def test_every_control_character_is_escaped_as_toml_requires():
    text = dump_config(parse_config({"name": CONTROL}))
    line = next(ln for ln in text.splitlines() if ln.startswith("name = "))
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)
    assert tomllib.loads(line)["name"] == CONTROL


def test_lone_surrogate_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"name must be valid Unicode text"):
        parse_config({"name": "a\udcffb"})
    with pytest.raises(ConfigError, match=r"data\.data_dir must be valid Unicode"):
        load_config(None, ["data.data_dir=x\udc80"])


def test_dates_and_deep_nesting_in_free_form_tables_are_refused(tmp_path):
    import datetime

    with pytest.raises(StelabTypeError, match=r"model\.estimator_params\.beta must be a string"):
        parse_config({"model": {"estimator_params": {"beta": datetime.date(1979, 5, 27)}}})
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"model\.weights.*nested more than 16 levels"):
        parse_config({"model": {"weights": {"fn": "sign", "x": deep}}})


def test_toml_date_plus_set_is_a_config_error_not_a_json_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[data]\nlimit = 1979-05-27\n")
    pattern = r"data\.limit must be an integer, got datetime\.date\(1979, 5, 27\)"
    with pytest.raises(StelabTypeError, match=pattern):
        load_config(path, ["train.seed=1"])


def test_deeply_nested_toml_and_set_values_are_config_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set optim\.betas: .*nested too deeply"):
        load_config(None, ["optim.betas=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.seed=4294967296", r"train\.seed must be an integer in \[0, 4294967295\]"),
        ("data.seed=18446744073709551616", r"data\.seed must be an integer in \[0, 18446744073"),
        ("data.batch_size=9223372036854775808", r"data\.batch_size must be an integer in \[1, 92"),
        ("train.epochs=99999999999999999999999", r"train\.epochs must be an integer in \[1, 92"),
    ],
)
def test_integers_beyond_what_torch_numpy_or_toml_take_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_largest_allowed_seeds_are_accepted():
    cfg = load_config(None, ["train.seed=4294967295", "data.seed=18446744073709551615"])
    assert cfg.train.seed == 2**32 - 1 and cfg.data.seed == 2**64 - 1
    assert parse_config(tomllib.loads(dump_config(cfg))) == cfg


def test_parse_config_refuses_what_its_writer_cannot_round_trip(monkeypatch):
    # the safety net behind every run folder: a writer that emits a raw U+007F (what
    # json.dumps does) must make parse_config refuse, not save an unreadable config.toml
    import json

    import stelab.config.tomlio as tomlio  # the writer parse_config checks itself with

    monkeypatch.setattr(tomlio, "toml_string", lambda s: json.dumps(s, ensure_ascii=False))
    with pytest.raises(ConfigError, match="cannot be written to TOML and read back"):
        parse_config({"name": "a\x7fb"})
    assert parse_config({"name": "ab"}).name == "ab"  # what it can round-trip still passes


def test_threads_default_auto_round_trips_and_integers_win(tmp_path):
    assert parse_config({}).train.threads == "auto"
    for raw in ({}, {"train": {"threads": "auto"}}, {"train": {"threads": 3}}):
        cfg = parse_config(raw)
        text = dump_config(cfg)
        assert parse_config(tomllib.loads(text)) == cfg
        assert dump_config(parse_config(tomllib.loads(text))) == text
    assert 'threads = "auto"' in dump_config(parse_config({}))
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    assert load_config(None, ["train.threads=2"]).train.threads == 2


@pytest.mark.parametrize(
    "value, pattern",
    [
        ("four", r"train\.threads must be an integer from 1 to 4096 or \"auto\", got 'four'"),
        ("Auto", r"train\.threads .*got 'Auto'"),
        (0, r"train\.threads.*0"),
        (4097, r"train\.threads.*4097"),
    ],
)
def test_bad_threads_name_the_key_and_what_is_allowed(value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({"train": {"threads": value}})
    with pytest.raises(ConfigError, match=r"train\.threads"):
        load_config(None, [f"train.threads={value}"])


def test_bool_threads_is_a_type_error():
    with pytest.raises(StelabTypeError, match=r"train\.threads"):
        parse_config({"train": {"threads": True}})
