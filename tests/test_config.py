"""gpt2ft.config and the train flags generated from it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gpt2ft.cli import build_parser, config_from_args
from gpt2ft.config import ConfigError, TrainConfig, build_config, load_config_file

REQUIRED_FLAGS = [
    "--model",
    "--data",
    "--output-dir",
    "--logs-dir",
    "--images-dir",
    "--epochs",
    "--max-steps",
    "--batch-size",
    "--learning-rate",
    "--max-length",
    "--max-train-dialogs",
    "--max-eval-dialogs",
    "--seed",
    "--keep-overlap",
    "--no-clean-text",
    "--loss-on",
    "--config",
]


def train_parser():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["train"]


def test_train_has_the_documented_flags():
    flags = {option for action in train_parser()._actions for option in action.option_strings}
    assert set(REQUIRED_FLAGS) <= flags


def test_no_flags_means_the_dataclass_defaults_and_nothing_typed():
    args = build_parser().parse_args(["train"])
    assert config_from_args(args) == (TrainConfig(), set())


def test_typed_flags_are_known_even_when_equal_to_the_default():
    args = build_parser().parse_args(["train", "--learning-rate", "5e-5", "--no-clean-text", "--batch-size", "16"])
    config, typed = config_from_args(args)
    assert typed == {"learning_rate", "clean_text", "batch_size"}
    assert config == TrainConfig(clean_text=False)


def test_choices_come_from_the_dataclass(capsys):
    for field in dataclasses.fields(TrainConfig):
        allowed = field.metadata.get("choices")
        if not allowed:
            continue
        flag = "--" + field.name.replace("_", "-")
        assert build_parser().parse_args(["train", flag, allowed[-1]]).__dict__[field.name] == allowed[-1]
        with pytest.raises(Exception, match="invalid choice"):
            build_parser().parse_args(["train", flag, "no-such-choice"])
        with pytest.raises(ConfigError, match=f"^{flag}: must be one of"):
            TrainConfig(**{field.name: "no-such-choice"})


def test_every_field_has_a_flag_and_help():
    flags = {action.dest for action in train_parser()._actions}
    for field in dataclasses.fields(TrainConfig):
        assert field.name in flags, field.name
        assert field.metadata.get("help"), field.name


def test_defaults_target_gpt2_small_on_a_t4():
    config = TrainConfig()
    assert (config.model, config.data, config.output_dir, config.logs_dir, config.images_dir) == (
        "gpt2",
        "hub",
        "gpt2_finetuned",
        "logs",
        "images",
    )
    assert (
        config.clean_text is None
        and not config.keep_overlap
        and config.loss_on == "auto"
        and config.precision == "auto"
    )
    assert (config.validation_fraction, config.test_fraction, config.dialog_column) == (0.05, 0.05, None)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 5, "learning-rate": 1e-4, "keep_overlap": True}))
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "2", "--no-clean-text"])
    config, typed = config_from_args(args)
    assert typed == {"epochs", "learning_rate", "keep_overlap", "clean_text"}
    assert config.epochs == 2 and config.learning_rate == 1e-4 and config.keep_overlap and not config.clean_text


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"epochs": -1}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"learning_rate": 0}, "--learning-rate"),
        ({"learning_rate": float("nan")}, "--learning-rate"),
        ({"max_steps": 0}, "--max-steps"),
        ({"max_length": 4}, "--max-length"),
        ({"loss_on": "some"}, "--loss-on"),
        ({"max_train_dialogs": 0}, "--max-train-dialogs"),
        ({"warmup_ratio": 1.5}, "--warmup-ratio"),
    ],
)
def test_validation_names_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=f"^{flag}:"):
        TrainConfig(**changes)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"epochz": 1}))
    with pytest.raises(ConfigError, match="unknown settings: epochz"):
        load_config_file(unknown)
    with pytest.raises(ConfigError, match="--batch-size: expected int"):
        build_config({"batch_size": "lots"})


def test_every_stage_config_extends_the_base_and_restates_only_what_differs():
    """RunConfig declares the shared settings once; a stage's config adds its own and restates a shared one only to
    give it another default (its help may be the stage's own), never another meaning."""
    from gpt2ft.config import PreferConfig, RunConfig

    base = {item.name: item for item in dataclasses.fields(RunConfig)}
    for stage in (TrainConfig, PreferConfig):
        assert issubclass(stage, RunConfig)
        fields = {item.name: item for item in dataclasses.fields(stage)}
        assert list(fields)[: len(base)] == list(base)  # the shared settings first, in the base's order
        for name, item in base.items():
            restated = fields[name]
            assert restated.metadata.get("run") == item.metadata.get("run"), name
            assert restated.metadata.get("choices") == item.metadata.get("choices"), name
    assert PreferConfig().batch_size != TrainConfig().batch_size  # a restated default
    assert PreferConfig().lora_r == TrainConfig().lora_r == RunConfig().lora_r  # an inherited one


def test_a_shared_check_runs_for_every_stage():
    from gpt2ft.config import PreferConfig

    for stage in (TrainConfig, PreferConfig):
        with pytest.raises(ConfigError, match="--epochs"):
            stage(epochs=0)
        with pytest.raises(ConfigError, match="--validation-fraction"):
            stage(validation_fraction=0.7)
