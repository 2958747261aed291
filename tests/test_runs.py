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
from gpt2ft.runs import (
    MAX_WARMUP_SHARE,
    RunTotals,
    Stage,
    WholeRunTrainer,
    capped_warmup,
    run_stage,
    sample_weights,
    warm_then_decay,
    weight_change,
)


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
        ("_determine_best_metric", ["self", "metrics", "trial"]),
        ("create_scheduler", ["self", "num_training_steps", "optimizer"]),
    ):
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters
    # The epoch loop: called once an epoch, before the epoch's first step (WholeRunTrainer takes no step after the
    # last one; tests/test_robustness.py's kill during the final save relies on it).
    assert "self._run_epoch(" in inspect.getsource(Trainer._inner_training_loop)
    # The best checkpoint: chosen in _determine_best_metric alone (WholeRunTrainer refuses unmoved weights there).
    assert "self._determine_best_metric(" in inspect.getsource(Trainer._maybe_log_save_evaluate)

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


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 10, 40, 1000])
@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.5, 0.99, 3, 50])
def test_warm_up_never_takes_a_short_run_and_no_step_runs_at_learning_rate_zero(total, warmup):
    """transformers' linear warm-up gives step 0 a learning rate of 0, and a ratio of a two-step run is a whole
    step: a run of a few steps (a handful of votes) could end where it began. Here every step has a positive rate,
    warm-up takes at most a quarter of the run, and the rate peaks once and decays to the last step."""
    steps = capped_warmup(total, warmup)
    assert 0 <= steps <= total * MAX_WARMUP_SHARE
    if warmup and total * MAX_WARMUP_SHARE >= (warmup if warmup >= 1 else 1):
        assert steps >= 1
    rates = [warm_then_decay(step, steps, total) for step in range(total)]
    assert all(0 < rate <= 1 for rate in rates)
    assert rates[steps] == 1.0 and max(rates) == 1.0
    assert rates[: steps + 1] == sorted(rates[: steps + 1]) and rates[steps:] == sorted(rates[steps:], reverse=True)


def test_weight_change_sees_one_element_moved_in_a_large_tensor_of_the_sample_only_if_sampled():
    """The sample behind weights_changed: a change to every element (what an AdamW step does) is seen at its size,
    nothing moved is exactly 0.0, and frozen tensors are not sampled."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    model[1].weight.requires_grad_(False)
    sample = sample_weights(model, per_tensor=100)
    assert set(sample.positions) == {"0.weight", "0.bias", "1.bias"}
    assert weight_change(model, sample) == 0.0
    with torch.no_grad():
        model[1].weight.add_(1.0)  # frozen: not the run's doing
    assert weight_change(model, sample) == 0.0
    with torch.no_grad():
        model[0].weight.add_(5e-6)
    assert weight_change(model, sample) == pytest.approx(5e-6, rel=1e-2)
