"""Config loading, interpolation, overrides, `_target_` building and typed sections, with their errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from automodel.config import (
    build,
    check_sections,
    interpolate,
    load_config,
    parse_overrides,
    parse_section,
    target_policy,
)
from automodel.errors import UserError
from automodel.training.step_scheduler import StepSchedulerConfig


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_overrides_and_types(tmp_path):
    path = write(tmp_path, "step_scheduler:\n  max_steps: 5\n  local_batch_size: 2\noptimizer:\n  lr: 0.1\n")
    cfg = load_config(path, ["--step_scheduler.max_steps", "10", "--optimizer.lr=1e-4",
                             "--optimizer.betas", "[0.8, 0.9]", "--peft.dim", "4", "--checkpoint.enabled", "false",
                             "--step_scheduler.num_epochs", "null"])
    assert cfg["step_scheduler"] == {"max_steps": 10, "local_batch_size": 2, "num_epochs": None}
    assert cfg["optimizer"] == {"lr": 1e-4, "betas": [0.8, 0.9]}
    assert cfg["peft"] == {"dim": 4}
    assert cfg["checkpoint"] == {"enabled": False}


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    """`lr: 1e-4` is what users write; PyYAML's own safe_load reads it as the string '1e-4'."""
    path = write(tmp_path, "optimizer:\n  lr: 1e-4\n  eps: 1E-8\n  betas: [9e-1, 0.95]\n"
                           "dataset:\n  name: 1e4x\n  version: '2e5'\n")
    cfg = load_config(path, ["--optimizer.weight_decay", "[1e-2]"])
    assert cfg["optimizer"] == {"lr": 1e-4, "eps": 1e-8, "betas": [0.9, 0.95], "weight_decay": [0.01]}
    assert cfg["dataset"] == {"name": "1e4x", "version": "2e5"}
    optimizer = build({"_target_": "torch.optim.AdamW", **cfg["optimizer"], "weight_decay": 0.01}, "optimizer",
                      params=[torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.defaults["lr"] == 1e-4


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("AM_DATA", "/data/squad")
    monkeypatch.delenv("AM_UNSET", raising=False)
    path = write(tmp_path, "a: ${oc.env:AM_DATA,/x}/train.json\nb: ${AM_UNSET,/default}/m\nc: ${AM_UNSET,7}\n")
    cfg = load_config(path)
    assert cfg == {"a": "/data/squad/train.json", "b": "/default/m", "c": 7}
    with pytest.raises(UserError, match="AM_UNSET is not set"):
        interpolate("${AM_UNSET}")


def test_build_target_recursively_with_injected_kwargs():
    node = {"_target_": "torch.optim.AdamW", "lr": 0.01, "betas": [0.9, 0.95]}
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build(node, "optimizer", params=params)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    stdlib = target_policy(cli=["collections.OrderedDict", "datetime.timedelta"], log=False)  # opted in
    nested = build({"_target_": "collections.OrderedDict", "inner": {"_target_": "datetime.timedelta",
                                                                     "minutes": 2}}, "x", policy=stdlib)
    assert nested["inner"].total_seconds() == 120


@pytest.mark.parametrize("node, message", [
    ({"_target_": "torch.optim.AdamWW"}, r"optimizer._target_: 'torch.optim.AdamWW' not found.*did you mean 'AdamW'"),
    ({"_target_": "torch.optim.nosuchmodule.Thing"}, r"optimizer._target_: 'torch.optim.nosuchmodule.Thing' not found"),
    ({"_target_": "torch.optim.AdamW", "lrr": 0.1}, r"optimizer.lrr: .*no argument 'lrr' \(did you mean 'lr'\?\)"),
    ({"_target_": "torch.optim.AdamW", "lr": "abc"}, r"optimizer.lr: expected a value like the default 0.001, got 'abc'"),
    ({"_target_": "torch.optim.AdamW", "lr": -1.0}, r"optimizer: building torch.optim.AdamW failed: Invalid learning rate"),
])
def test_build_errors_name_the_key(node, message):
    with pytest.raises(UserError, match=message):
        build(node, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])


def test_injected_key_in_config_is_refused():
    with pytest.raises(UserError, match="optimizer.params: set by the recipe"):
        build({"_target_": "torch.optim.SGD", "params": []}, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])


def test_unknown_section_suggests():
    with pytest.raises(UserError, match="unknown config section 'step_schedular' \\(did you mean 'step_scheduler'"):
        check_sections({"model": {}, "step_schedular": {}})


@dataclass
class _Demo:
    size: int = 1
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    name: str | None = None


def test_typed_section_checks_keys_and_types():
    assert parse_section(_Demo, {"size": 3, "rate": 1, "mode": "b"}, "demo") == _Demo(3, 1.0, "b")
    with pytest.raises(UserError, match=r"demo.sise: unknown setting \(did you mean 'size'\?\)"):
        parse_section(_Demo, {"sise": 3}, "demo")
    with pytest.raises(UserError, match=r"demo.size: expected int, got 'abc'"):
        parse_section(_Demo, {"size": "abc"}, "demo")
    with pytest.raises(UserError, match=r"demo.mode: expected one of 'a', 'b', got 'c'"):
        parse_section(_Demo, {"mode": "c"}, "demo")
    with pytest.raises(UserError, match=r"demo.size: expected int, got True"):
        parse_section(_Demo, {"size": True}, "demo")


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "model:\n  a: [1, 2\n")
    with pytest.raises(UserError, match=r"YAML syntax error in .*cfg.yaml:\d+:\d+"):
        load_config(bad)


@pytest.mark.parametrize("args, message", [
    (["step_scheduler.max_steps", "3"], "unexpected argument"),
    (["--step_scheduler.max_steps"], "has no value"),
    (["--a..b", "1"], "expected a dotted key"),
])
def test_bad_override_syntax(args, message):
    with pytest.raises(UserError, match=message):
        parse_overrides(args)


def test_override_through_a_value_is_refused(tmp_path):
    path = write(tmp_path, "seed: 1\n")
    with pytest.raises(UserError, match="'seed' is a value"):
        load_config(path, ["--seed.x", "2"])


def test_grad_accumulation_is_derived_and_checked():
    steps = StepSchedulerConfig(global_batch_size=32, local_batch_size=4)
    assert steps.grad_accumulation_steps(dp_size=1) == 8
    assert steps.grad_accumulation_steps(dp_size=2) == 4
    with pytest.raises(UserError, match="global_batch_size 32 is not a multiple of local_batch_size 4 x "
                                        "data-parallel size 3"):
        steps.grad_accumulation_steps(dp_size=3)


def test_max_steps_wins_and_num_epochs_bounds():
    assert StepSchedulerConfig(max_steps=50).total_steps(10)[0] == 50
    assert StepSchedulerConfig(max_steps=50, num_epochs=2).total_steps(10)[0] == 20
    assert StepSchedulerConfig(num_epochs=3).total_steps(10)[0] == 30
    assert StepSchedulerConfig().total_steps(10)[0] == 10
