"""The registry turns YAML blocks into typed parameters and refuses anything it does not know."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from effitrain.config.blocks import load_builtin_blocks
from effitrain.registry import REGISTRY, ConfigError, Registry, load_plugins, param


@pytest.fixture()
def registry():
    reg = Registry()

    @reg.register("optimizer", "toy", builder="builtins:dict")
    @dataclass
    class Toy:
        lr: float = param(1e-3, gt=0)
        rank: int = param(4, ge=1)
        kind: Literal["a", "b"] = "a"
        targets: list[str] = param(default_factory=lambda: ["q_proj"])
        scale: Optional[float] = None
        flag: bool = False

    return reg


def test_a_valid_block_becomes_typed_params(registry):
    block = registry.parse("optimizer", {"name": "toy", "lr": 3, "rank": 8, "targets": ["a", "b"]})
    assert block.params.lr == 3.0 and isinstance(block.params.lr, float)
    assert block.params.rank == 8 and block.params.targets == ["a", "b"]


@pytest.mark.parametrize("block, message", [
    ({"name": "toyy"}, "optimizer.name: unknown optimizer 'toyy' (did you mean 'toy'?); valid: toy"),
    ({"name": "toy", "lrr": 1}, "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    ({"name": "toy", "lr": "1e-3"}, "optimizer.lr: expected a number, got '1e-3'"),
    ({"name": "toy", "rank": -4}, "optimizer.rank: -4 is out of range, it must be >= 1"),
    ({"name": "toy", "rank": 2.5}, "optimizer.rank: expected an integer, got 2.5"),
    ({"name": "toy", "flag": 1}, "optimizer.flag: expected a boolean, got 1"),
    ({"name": "toy", "kind": "c"}, "optimizer.kind: 'c' is not one of 'a', 'b'"),
    ({"name": "toy", "targets": "q_proj"}, "optimizer.targets: expected a list of strings, got 'q_proj'"),
    ({"lr": 1}, "optimizer.name: required key is missing; valid: toy"),
])
def test_bad_blocks_are_one_readable_line(registry, block, message):
    with pytest.raises(ConfigError) as err:
        registry.parse("optimizer", block)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_yaml_cannot_name_a_python_callable():
    load_builtin_blocks()
    with pytest.raises(ConfigError, match="unknown optimizer 'os:system'"):
        REGISTRY.parse("optimizer", {"name": "os:system"})


def test_builders_are_imported_only_when_built(tmp_path, monkeypatch):
    (tmp_path / "lazy_builder_mod.py").write_text("def build(params, scale):\n    return params.rank * scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()

    @reg.register("optimizer", "lazy", builder="lazy_builder_mod:build")
    @dataclass
    class Lazy:
        rank: int = 2

    block = reg.parse("optimizer", {"name": "lazy", "rank": 5})
    assert "lazy_builder_mod" not in sys.modules  # validating imports no builder (so no torch)
    assert block.build(scale=3) == 15
    sys.modules.pop("lazy_builder_mod", None)


def test_plugins_register_their_own_blocks(tmp_path, monkeypatch):
    (tmp_path / "my_effitrain_plugin.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from effitrain.registry import register

        @register("method", "my_method", builder="my_effitrain_plugin:build")
        @dataclass
        class MyMethod:
            every: int = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["my_effitrain_plugin"])
    assert REGISTRY.parse("method", {"name": "my_method", "every": 5}).params.every == 5
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_plugin_mod'"):
        load_plugins(["no_such_plugin_mod"])
    sys.modules.pop("my_effitrain_plugin", None)
