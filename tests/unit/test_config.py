from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from personalign.config import from_dict, load_config, parse_overrides, to_dict
from personalign.errors import ConfigError
from personalign.generation import SamplingConfig


@dataclass(frozen=True)
class Inner:
    r: int = 8
    alpha: float = 32.0


@dataclass(frozen=True)
class Outer:
    name: str
    sides: tuple[str, ...] = ("P1A",)
    lr: float = 1e-5
    limit: int | None = None
    debug: bool = False
    lora: Inner = field(default_factory=Inner)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nsides: [P2A, P2B]\nlora: {r: 4}\n")
    cfg = load_config(Outer, f, ["lr=2e-4", "lora.alpha=16", "limit=10", "debug=true", "sampling.temperature=0"])
    assert cfg == Outer("x", ("P2A", "P2B"), 2e-4, 10, True, Inner(4, 16.0), SamplingConfig(temperature=0.0))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "x", "lrr": 1}, "unknown field(s) lrr; valid fields: name, sides"),
        ({"name": "x", "lora": {"rank": 2}}, "config.lora: unknown field(s) rank"),
        ({"name": "x", "lr": "fast"}, "config.lr: expected a number, got 'fast'"),
        ({"name": "x", "lora": {"r": 2.5}}, "config.lora.r: expected an integer"),
        ({"name": "x", "debug": "maybe"}, "expected true or false"),
        ({}, "required field(s) missing: name"),
        ({"name": "x", "sampling": {"top_p": 0}}, "top_p must be in (0, 1]"),
        ([1], "expected a mapping of fields"),
    ],
)
def test_strict_errors(data, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert fragment in str(err.value)


def test_override_syntax_and_files(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=x", "d="]) == {"a": {"b": 1, "c": "x"}, "d": ""}
    with pytest.raises(ConfigError, match="must look like field=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, lst)


@pytest.mark.parametrize(("text", "fragment"), [
    ("name: x\nsampling: 5\n", "sampling: expected a mapping of fields, got int"),
    ("sampling: {max_new_tokens: 4.5}\n", "sampling.max_new_tokens: expected an integer, got 4.5"),
    ("name: [x]\n", "name: expected a string"),
    ("lora: {rank: 2}\n", "lora: unknown field(s) rank"),
])
def test_a_file_value_replaced_by_a_flag_is_still_checked(tmp_path, text, fragment):
    """The file is one layer, checked on its own: a flag that replaces a bad value does not hide it."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    given = {"name": "y", "sampling.max_new_tokens": 3, "lora.r": 2}
    with pytest.raises(ConfigError) as err:
        load_config(Outer, f, given=given)
    assert fragment in str(err.value) and str(f) in str(err.value)
    f.write_text("lora: {alpha: 8}\n")  # a file without the required name: the flag gives it
    assert load_config(Outer, f, given=given) == Outer("y", lora=Inner(2, 8.0),
                                                       sampling=SamplingConfig(max_new_tokens=3))
