"""gpt2ft.runs: the run library every stage shares (plan, totals, the Trainer mixin, fit, save, publish), and the
table of stages the command line is built from."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import config_for
from transformers import Trainer

from gpt2ft.cli import STAGES, build_parser, main
from gpt2ft.config import RunConfig, config_fields, flag_name
from gpt2ft.runs import RunTotals, Stage, WholeRunTrainer, run_stage


def test_every_stage_row_resolves_to_a_run_function_over_its_config():
    for stage in STAGES:
        assert issubclass(stage.config_class, RunConfig)
        run = stage.run_function()
        assert list(inspect.signature(run).parameters)[0] == "config"
        assert "explicit" in inspect.signature(run).parameters
        module = inspect.getmodule(run)
        parts = [value for value in vars(module).values() if isinstance(value, Stage)]
        assert [part.name for part in parts] == [stage.name]  # the module holds exactly its own stage's parts


def test_the_command_line_has_a_command_per_stage_with_a_flag_per_setting():
    commands = build_parser()._subparsers._group_actions[0].choices
    for stage in STAGES:
        flags = {option for action in commands[stage.name]._actions for option in action.option_strings}
        for item in config_fields(stage.config_class):
            negated = "--no-" + item.name.replace("_", "-")
            assert flag_name(item.name) in flags or negated in flags, (stage.name, item.name)


def test_a_bad_flag_of_any_stage_is_one_line_before_its_libraries_load(capsys, monkeypatch):
    """The stage's module (torch, transformers, TRL) is imported only once every flag has been checked."""
    imported = []
    for stage in STAGES:
        monkeypatch.setattr(type(stage), "run_function", lambda self: imported.append(self.name))
        assert main([stage.name, "--epochs", "0"]) == 2
        assert capsys.readouterr().err.strip() == "error: --epochs: must be a positive number, got 0.0"
    assert imported == []


def test_a_stage_has_every_part_run_stage_calls():
    """The Stage interface is the whole contract: run_stage calls nothing else of a stage."""
    from gpt2ft.prefer import PREFER
    from gpt2ft.training import TRAIN

    source = inspect.getsource(run_stage)
    used = {name for name in (field.name for field in dataclasses.fields(Stage)) if f"stage.{name}" in source}
    settings = {"name", "stopped", "nan_advice", "card_charts"}  # the Stage's texts; every other part is a function
    for stage in (TRAIN, PREFER):
        for name in used - settings:
            assert callable(getattr(stage, name)), (stage.name, name)
    assert {"plan", "prepare", "load", "rows", "settings", "trainer", "measure", "metrics", "record"} <= used


def test_the_private_trainer_hooks_gpt2ft_overrides_still_exist_and_are_called(
    tiny_model_dir, dailydialog_dir, run_dirs
):
    """WholeRunTrainer overrides private Trainer methods (no public hook gives the gradient norm as a tensor, sees
    every save, or comes before a resumed epoch's first step): pin that transformers still has them, calls them,
    and passes what gpt2ft relies on."""
    for name, parameters in (
        ("_clip_grad_norm", ["self", "model"]),
        ("_save_checkpoint", ["self", "model", "trial"]),
        ("_issue_warnings_after_load", ["self", "load_result"]),
    ):
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters
    # The epoch loop: called once an epoch, before the epoch's first step (WholeRunTrainer takes no step after the
    # last one; tests/test_robustness.py's kill during the final save relies on it).
    assert "self._run_epoch(" in inspect.getsource(Trainer._inner_training_loop)

    from gpt2ft.training import train

    calls = {"norms": [], "saves": 0}
    original_clip, original_save = WholeRunTrainer._clip_grad_norm, WholeRunTrainer._save_checkpoint

    def clip(self, model):
        norm = original_clip(self, model)
        calls["norms"].append(norm)
        return norm

    def save(self, model, trial):
        calls["saves"] += 1
        return original_save(self, model, trial)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WholeRunTrainer, "_clip_grad_norm", clip)
        patch.setattr(WholeRunTrainer, "_save_checkpoint", save)
        config = config_for(tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "4", "--eval-steps", "2")
        result = train(config)
    assert len(calls["norms"]) == result.metrics["steps"] == 4
    assert all(torch.is_tensor(norm) for norm in calls["norms"])  # a tensor: read from the GPU only when logged
    assert calls["saves"] == 2  # every checkpoint goes through it (steps 2 and 4)


def test_a_nan_gradient_norm_is_a_bad_step():
    totals = RunTotals()
    totals.add(torch.tensor([[1, 2, 3]]), torch.tensor(1.0))
    totals.add_gradient_norm(torch.tensor(float("nan")))

    class Control:
        should_log = should_evaluate = should_save = should_training_stop = False

    class State:
        global_step = 3

    class Args:
        world_size = 1

    control = Control()
    control.should_log = True
    totals.on_step_end(Args(), State(), control)
    assert totals.bad_step == 3 and control.should_training_stop and not control.should_save
