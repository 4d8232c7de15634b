import dataclasses
from typing import Literal

import pytest

from relret.config import ConfigError, LossConfig, dump_yaml, from_dict, load_config, to_dict


@dataclasses.dataclass
class _Inner:
    """A nested section."""

    size: Literal["tiny", "base"] = "tiny"
    dims: tuple[int, ...] = (1, 2)
    pair: tuple[float, str] = (0.5, "a")


@dataclasses.dataclass
class _Outer:
    """A top-level config for the tests."""

    name: str = "x"
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    path: str | None = None
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    """Defaults, then YAML differences, then dotted CLI overrides win."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 3\ninner:\n  size: base\nloss:\n  relevance:\n    a: 3.0\n")
    cfg = load_config(_Outer, path, ["steps=7", "loss.relevance.b=5", "inner.dims=[4, 5]", "path=null"])
    assert (cfg.name, cfg.lr, cfg.steps, cfg.inner.size, cfg.inner.dims) == ("x", 0.5, 7, "base", (4, 5))
    assert (cfg.loss.relevance.a, cfg.loss.relevance.b, cfg.loss.tau) == (3.0, 5.0, 0.05)
    assert cfg.path is None


def test_exponent_without_dot_is_a_number(tmp_path):
    """`lr: 2e-5` (a string to PyYAML, which wants 2.0e-5) is read as the number it means, in files and overrides."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2e-5\n")
    assert load_config(_Outer, path).lr == 2e-5
    assert load_config(_Outer, None, ["lr=-3E+2"]).lr == -300.0
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got '1e3'"):
        load_config(_Outer, None, ["steps=1e3"])


def test_fixed_length_tuple(tmp_path):
    """A tuple[float, str] field converts each item with its own type, also when read back from a dumped YAML."""
    cfg = load_config(_Outer, None, ["inner.pair=[1, b]"])
    assert cfg.inner.pair == (1.0, "b") and isinstance(cfg.inner.pair[0], float)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(_Outer, path).inner.pair == (1.0, "b")
    with pytest.raises(ConfigError, match=r"inner\.pair\[1\]: expected a string, got 2"):
        load_config(_Outer, None, ["inner.pair=[1, 2]"])
    with pytest.raises(ConfigError, match=r"inner\.pair: expected 2 items, got 3"):
        load_config(_Outer, None, ["inner.pair=[1, a, b]"])


def test_round_trip_through_yaml(tmp_path):
    """A resolved config dumped to YAML loads back equal."""
    cfg = load_config(_Outer, None, ["loss.direction=both", "inner.size=base"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(_Outer, path) == cfg
    assert to_dict(cfg)["loss"]["listnet"]["relevance"]["fn"] == "logistic"  # ListNet's own section


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["lossx.tau=1"], r"unknown key lossx; the keys of _Outer are: name, lr, steps"),
        (["loss.relevance.fnn=binary"], r"unknown key loss\.relevance\.fnn; the keys of loss\.relevance are: fn, a"),
        (["loss.direction=up"], r"loss\.direction: expected one of 't2a', 'a2t', 'both', got 'up'"),
        (["steps=1.5"], r"steps: expected an integer, got 1\.5"),
        (["lr=fast"], r"lr: expected a number, got 'fast'"),
        (["flag=1"], r"flag: expected true or false, got 1"),
        (["inner.size=huge"], r"inner\.size: expected one of 'tiny', 'base'"),
        (["inner.dims=3"], r"inner\.dims: expected a list"),
        (["loss.tau=0"], r"loss\.tau must be > 0"),
        (["loss=3"], r"loss: expected a mapping"),
        (["novalue"], r"not of the form dotted\.key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, match):
    """Unknown keys and wrong types are refused with the dotted key and the allowed keys or values."""
    with pytest.raises(ConfigError, match=match):
        load_config(_Outer, None, overrides)


def test_bad_yaml_files(tmp_path):
    """A missing file, invalid YAML or a non-mapping top level is refused naming the file."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(_Outer, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_Outer, bad)


def test_direct_construction_is_validated():
    """Building a section in Python validates its choices as the loader does."""
    with pytest.raises(ConfigError, match="loss.name: expected one of 'listnet', 'infonce'"):
        LossConfig(name="triplet")
    with pytest.raises(ConfigError, match="unknown key foo"):
        from_dict(LossConfig, {"foo": 1})
