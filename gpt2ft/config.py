"""Settings for a gpt2ft run: one base dataclass with every setting the stages share, one subclass per stage, and
the artifact folders.

`python -m gpt2ft train ...` and the notebook build a `TrainConfig`; `python -m gpt2ft prefer ...` (preference
tuning, gpt2ft/prefer.py) builds a `PreferConfig`. Both extend `RunConfig`, which declares the shared settings
once, with their defaults and help; a stage adds its own fields and restates (`restate`) only the defaults that
differ. The CLI flags are generated from the fields, so a default lives in exactly one place.

This module imports nothing heavy: the CLI checks every flag with it before torch or transformers load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Artifact folders at the project root (git keeps them; what runs write inside is ignored).
DATA_DIR = "data"
LOGS_DIR = "logs"
IMAGES_DIR = "images"
OUTPUT_DIR = "gpt2_finetuned"
# Preference tuning starts from the fine-tuned model and writes beside it, never over it; its logs and charts get
# their own folders so they do not replace the fine-tuning run's metrics.json and charts.
PREFER_OUTPUT_DIR = "gpt2_preferred"
PREFER_LOGS_DIR = "logs/prefer"
PREFER_IMAGES_DIR = "images/prefer"
# The votes database the web page (`python -m gpt2ft serve`) writes; votes.py uses the same path.
VOTES_DB = "logs/votes.sqlite"
# Where the web page listens and how it generates (`python -m gpt2ft serve`'s defaults; serve.py uses the same).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_TIME_LIMIT_S = 60.0
# Generations at once. Each holds one model forward pass at a time; more than a few on one CPU or GPU only makes
# every reply slower, while the queue keeps the page itself responsive.
DEFAULT_CONCURRENCY = 4
TRAINING_CONFIG = "training_config.json"

# GPT-2's context window; DailyDialog's longest dialogue is ~900 tokens, so 1024 keeps every dialogue whole.
GPT2_CONTEXT = 1024


def flag_name(field_name: str) -> str:
    """The CLI flag for a config field: `max_train_dialogs` -> `--max-train-dialogs`."""
    return "--" + field_name.replace("_", "-")


def render_flag(field_name: str, value: Any) -> str:
    """A setting as it is typed on the command line: `--batch-size 8`, `--gradient-checkpointing`, `--no-clean-text`."""
    if isinstance(value, bool):
        return flag_name(field_name) if value else "--no-" + field_name.replace("_", "-")
    return f"{flag_name(field_name)} {shlex.quote(str(value))}"


def setting(default: Any, help: str, run: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, its help (the flag's), whether it defines the run (a checkpoint resumes only
    under the same value) and, for a choice, the values allowed."""
    metadata: dict[str, Any] = {"help": help, "run": run}
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """The settings every stage shares (model, folders, schedule, precision, method, presets), with their defaults.
    Defaults target GPT-2 small (124M) on a free Colab T4 (15 GB)."""

    # --- what to train, on what, and where the results go ------------------------------------------------------
    model: str = setting("gpt2", "Hub id (gpt2, gpt2-medium, ...) or a local save_pretrained folder.", run=True)
    data: str = setting(
        "hub",
        "'hub' (DailyDialog), a DailyDialog copy, a .jsonl/.json/.parquet file of conversations, a folder of "
        "train/validation/test files, or hub:OWNER/NAME[@REV][:CONFIG].",
        run=True,
    )
    output_dir: str = setting(OUTPUT_DIR, "Where the final model, tokenizer and configs are written.")
    logs_dir: str = setting(LOGS_DIR, "Where metrics.json and the JSONL logs are written.")
    images_dir: str = setting(IMAGES_DIR, "Where the charts are written.")
    cache_dir: str = setting(DATA_DIR, "Where downloads and the tokenised-data cache live.")
    max_length: int = setting(
        0, "Longest training sequence in tokens; 0 = the model's context (1024 for GPT-2).", run=True
    )
    validation_fraction: float = setting(
        0.05,
        "Share of a source without a validation split held out for it (chosen by a hash of each dialogue).",
        run=True,
    )

    # --- optimisation -------------------------------------------------------------------------------------------
    epochs: float = setting(3.0, "Passes over the training data.", run=True)
    max_steps: int = setting(-1, "Stop after this many optimiser steps (overrides --epochs when > 0).", run=True)
    # 16 dialogues of ~123 tokens (~2k tokens a step) keep GPT-2 small's activations at a few GB in fp16, far below
    # a T4's 15 GB even for the longest (~900-token) dialogues. Out of memory stops the run with settings that fit.
    batch_size: int = setting(
        16,
        "Dialogues per device per step (before gradient accumulation); packed, a token budget: as many 512-token "
        "rows as this many dialogues of the data's mean length fill.",
        run=True,
    )
    eval_batch_size: int = setting(32, "Dialogues per device per evaluation batch.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated into one optimiser step.", run=True)
    learning_rate: float = setting(
        5e-5, "Peak learning rate (AdamW), reached after warmup, then linear decay to 0.", run=True
    )
    warmup_ratio: float = setting(0.05, "Share of the steps spent warming the learning rate up.", run=True)
    weight_decay: float = setting(0.01, "AdamW weight decay.", run=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", run=True)
    optim: str = setting(
        "auto",
        "Trainer optimiser name (adamw_torch_fused, adamw_bnb_8bit, ...); 'auto' = fused AdamW on CUDA, AdamW "
        "elsewhere.",
        run=True,
    )
    precision: str = setting(
        "auto",
        "'auto' (fp16 below compute capability 8.0, bf16 from 8.0, fp32 on CPU), 'fp16', 'bf16' or 'fp32'.",
        choices=("auto", "fp16", "bf16", "fp32"),
    )
    seed: int = setting(42, "Seed for initialisation, shuffling and dropout.", run=True)

    # --- evaluation, logging, checkpoints -----------------------------------------------------------------------
    eval_steps: int = setting(0, "Evaluate (and checkpoint) every N steps; 0 = once an epoch.")
    logging_steps: int = setting(10, "Log training loss every N steps.")
    save_total_limit: int = setting(2, "Checkpoints kept (the best one is always kept).")
    keep_checkpoints: bool = setting(
        False,
        "Keep the checkpoints after a successful run (by default they are deleted once the final model is saved).",
    )
    resume: str = setting(
        "auto",
        "'auto': continue from the latest complete checkpoint of this run if one exists; 'never'; or a checkpoint "
        "path.",
    )
    overwrite: bool = setting(False, "Replace an output folder that holds something other than a gpt2ft model.")
    allow_unchanged: bool = setting(
        False,
        "Exit 0 even when the saved weights equal the starting model's (a warning, metrics.json and the card still "
        "say so).",
    )
    report_to: str = setting("none", "Also report to 'tensorboard' or 'wandb' (comma-separated), through the Trainer.")
    system_interval_s: float = setting(2.0, "Seconds between system-metric samples (CPU, memory, disk, GPU).")
    num_workers: int = setting(-1, "DataLoader worker processes; -1 = 2 on CUDA, 0 on CPU.")

    # --- scale --------------------------------------------------------------------------------------------------
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass to save memory.")
    method: str = setting(
        "full",
        "'full' fine-tuning or 'lora' (PEFT adapters, merged into the saved model).",
        run=True,
        choices=("full", "lora"),
    )
    lora_r: int = setting(16, "LoRA rank.", run=True)
    lora_alpha: int = setting(32, "LoRA scaling (alpha / r multiplies the update).", run=True)
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input.", run=True)
    lora_targets: str = setting(
        "auto",
        "Comma-separated linear modules that get adapters; 'auto' = the family's (GPT-2: c_attn,c_proj; Llama, "
        "Qwen, Mistral: q/k/v/o_proj,gate/up/down_proj).",
        run=True,
    )
    t4_presets: bool = setting(
        True,
        "On a ~15 GB GPU, switch models of 355M+ parameters (any family, by parameter count) to settings that fit "
        "(LoRA, 8-bit optimiser, checkpointing, smaller batches with accumulation).",
    )

    def __post_init__(self) -> None:
        check_run_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def restate(name: str, default: Any, help: str | None = None) -> Any:
    """A RunConfig field with a stage's own default (and, when given, its own help); the rest of its metadata
    (whether it defines the run, its choices) stays the base's. The field keeps its place in the base's order."""
    base = RunConfig.__dataclass_fields__[name]
    return field(default=default, metadata={**base.metadata, **({"help": help} if help else {})})


@dataclass
class TrainConfig(RunConfig):
    """Every setting of a fine-tuning run (`python -m gpt2ft train`, gpt2ft/training.py): the shared settings of
    RunConfig and the data preparation and speed settings of its own."""

    # --- data preparation ---------------------------------------------------------------------------------------
    max_train_dialogs: int | None = setting(None, "Use only the first N training dialogues (debugging).", run=True)
    max_eval_dialogs: int | None = setting(None, "Use only the first N validation dialogues (debugging).", run=True)
    keep_overlap: bool = setting(
        False,
        "Keep the splits as they are: no de-duplication of train, no removal of train dialogues from validation/test.",
        run=True,
    )
    clean_text: bool | None = setting(
        None,
        "Detokenise the text ('it ' s' -> 'it's'): by default DailyDialog only; --clean-text for any source, "
        "--no-clean-text for none.",
        run=True,
    )
    dialog_column: str | None = setting(
        None,
        "The column holding each conversation (messages, ShareGPT turns or a list of strings), when it is not "
        "detected.",
        run=True,
    )
    test_fraction: float = setting(
        0.05, "Share of a source without a test split held out for it (chosen by a hash of each dialogue).", run=True
    )
    loss_on: str = setting(
        "auto",
        "'auto': 'assistant' for data with roles, else 'all'; 'all': every turn is a target; 'responses': all but "
        "the first; 'assistant': assistant turns only.",
        run=True,
        choices=("auto", "all", "responses", "assistant"),
    )
    batching: str = setting(
        "pack",
        "'pack': several dialogues a row of 512 tokens, attention kept inside each; 'pad': one dialogue a row, "
        "padded to the next of a few fixed widths.",
        run=True,
        choices=("pack", "pad"),
    )

    # --- controls (gpt2ft/controls.py) ------------------------------------------------------------------------------
    condition: str = setting(
        "none",
        "Train with DailyDialog's labels as controls: 'emotion', 'act' or 'emotion,act' put each turn's label in "
        "front of its text as an input (never a target), so replies can be asked for in an emotion or act.",
        run=True,
        choices=("none", "emotion", "act", "emotion,act"),
    )
    # 20 contexts x 11 labels = 220 replies: a minute on a T4, and each label's accuracy within ~+-0.1 (binomial).
    control_contexts: int = setting(
        20, "A conditioned run asks for every label on this many held-out test contexts, judged after training."
    )

    # --- speed ----------------------------------------------------------------------------------------------------
    compile: bool = setting(
        False,
        "torch.compile the model (pays a warm-up; batches come in a few fixed shapes, so it compiles a few graphs).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_train_dialogs", "max_eval_dialogs"):
            check_optional_count(self, name)
        check_fraction(self, "test_fraction")
        if self.dialog_column is not None and not self.dialog_column.strip():
            raise ConfigError(f"{flag_name('dialog_column')}: must not be empty")
        if self.control_contexts < 1:
            raise ConfigError(f"--control-contexts: must be at least 1, got {self.control_contexts}")


@dataclass
class PreferConfig(RunConfig):
    """Every setting of a preference-tuning run (`python -m gpt2ft prefer`, gpt2ft/prefer.py): the shared settings of
    RunConfig, starting from the model `train` wrote, and the preference data and objective of its own."""

    model: str = restate(
        "model",
        OUTPUT_DIR,
        "The model to start from: a folder written by train (or prefer), another GPT-2 folder, or a Hub id.",
    )
    data: str = restate(
        "data",
        VOTES_DB,
        "The preferences: a votes database written by serve, a .jsonl/.json/.parquet file or a folder in TRL's "
        "preference layouts, or hub:OWNER/NAME[@REV][:CONFIG].",
    )
    output_dir: str = restate("output_dir", PREFER_OUTPUT_DIR, "Where the preference-tuned model is written.")
    logs_dir: str = restate("logs_dir", PREFER_LOGS_DIR)
    images_dir: str = restate("images_dir", PREFER_IMAGES_DIR)
    max_length: int = restate(
        "max_length",
        0,
        "Longest prompt + reply in tokens; 0 = the model's context (1024 for GPT-2). A longer prompt keeps its "
        "latest turns.",
    )
    validation_fraction: float = restate(
        "validation_fraction",
        0.1,
        "Share of conversations held out (by a hash of the conversation) when the source has no validation or test "
        "split.",
    )
    # A few hundred votes make a small data set: several passes. The learning rate is the base's 5e-5, measured on
    # SmolLM2-135M (bench/RESULTS.md, "Preference tuning"): 10 DPO steps on 73 pairs at 5e-6 took the training loss
    # from 0.693 to 0.678 and the held-out reward margin to 0.016; at 5e-5, to 0.594 and 0.081. TRL's 1e-6 and the
    # 5e-6 used here before are rates for 7B models; a 124-135M model moves at 5e-5 in a round's few steps.
    epochs: float = restate("epochs", 3.0, "Passes over the preference data.")
    # Each pair is two sequences, each scored by the model and by the reference: 8 pairs is 32 forward passes a step.
    batch_size: int = restate(
        "batch_size", 8, "Pairs (KTO: examples) per device per step, before gradient accumulation."
    )
    eval_batch_size: int = restate("eval_batch_size", 16, "Pairs (KTO: examples) per device per evaluation batch.")
    warmup_ratio: float = restate("warmup_ratio", 0.1)
    weight_decay: float = restate("weight_decay", 0.0)
    method: str = restate(
        "method",
        "full",
        "'full': tune every weight (the reference is a frozen copy); 'lora': PEFT adapters, merged into the saved "
        "model (the reference is the model with its adapters off: no second copy).",
    )

    # --- preference data ------------------------------------------------------------------------------------------
    algorithm: str = setting(
        "dpo",
        "'dpo': learns from pairs (a better and a worse reply); 'kto': from single replies marked good or bad.",
        run=True,
        choices=("dpo", "kto"),
    )
    sft_data: str | None = setting(
        None,
        "Conversations whose validation perplexity is measured before and after (default: the data recorded in "
        "--model's folder; 'none' skips it).",
    )
    # Scored twice (before and after) with every pair also scored: 200 dialogues of each split keep that to seconds on
    # a T4 while the perplexity's standard error stays ~1%.
    max_sft_dialogs: int | None = setting(200, "Score at most N validation and N test dialogues of those.")
    max_train_pairs: int | None = setting(None, "Use only the first N training pairs (KTO: examples).", run=True)
    max_eval_pairs: int | None = setting(None, "Use only the first N held-out pairs (KTO: examples).", run=True)

    # --- the objective ----------------------------------------------------------------------------------------------
    # 0.1 is the DPO and KTO papers' (and TRL's) default: higher keeps the model closer to where it started.
    beta: float = setting(0.1, "How far the model may move from the model it started from (higher: less).", run=True)
    desirable_weight: float | None = setting(
        None,
        "KTO: weight of the good replies' loss; unset: chosen from the counts so both sides weigh alike (KTO paper, "
        "eq. 8).",
        run=True,
    )
    undesirable_weight: float | None = setting(
        None, "KTO: weight of the bad replies' loss; unset: chosen from the counts.", run=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_train_pairs", "max_eval_pairs", "max_sft_dialogs"):
            check_optional_count(self, name)
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"--beta: must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{flag_name(name)}: must be > 0, got {value}")
        if self.algorithm == "kto" and self.batch_size < 2:
            # TRL's KTO estimates its KL term by pairing each example with another reply of the same micro-batch.
            raise ConfigError(
                "--batch-size: KTO needs at least 2 examples a micro-batch (its KL estimate pairs each with another), "
                f"got {self.batch_size}"
            )
        if self.sft_data is not None and not self.sft_data.strip():
            raise ConfigError("--sft-data: must not be empty (use 'none' to skip the perplexity measurement)")


def check_run_settings(config: RunConfig) -> None:
    """The checks of the settings every stage shares: the optimisation, logging and LoRA numbers are in range, a
    field with `choices` holds one of them, and no folder, model or data setting is empty.

    Raises:
        ConfigError: naming the setting as its flag.
    """

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{flag_name(name)}: {why}")

    if not (config.epochs > 0 and math.isfinite(config.epochs)):
        raise bad("epochs", f"must be a positive number, got {config.epochs}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise bad("max_steps", f"must be a positive number of steps or -1 (use --epochs), got {config.max_steps}")
    for name in (
        "batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_total_limit",
        "lora_r",
        "lora_alpha",
    ):
        if getattr(config, name) < 1:
            raise bad(name, f"must be at least 1, got {getattr(config, name)}")
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise bad("learning_rate", f"must be > 0, got {config.learning_rate}")
    if not 0 <= config.warmup_ratio < 1:
        raise bad("warmup_ratio", f"must be in [0, 1), got {config.warmup_ratio}")
    if config.weight_decay < 0:
        raise bad("weight_decay", f"must be >= 0, got {config.weight_decay}")
    if config.max_grad_norm <= 0:
        raise bad("max_grad_norm", f"must be > 0, got {config.max_grad_norm}")
    if config.max_length < 0 or 0 < config.max_length < 8:
        raise bad("max_length", f"must be 0 (the model's context) or at least 8 tokens, got {config.max_length}")
    if config.eval_steps < 0:
        raise bad("eval_steps", f"must be >= 0, got {config.eval_steps}")
    if config.system_interval_s <= 0:
        raise bad("system_interval_s", f"must be > 0, got {config.system_interval_s}")
    if not 0 <= config.lora_dropout < 1:
        raise bad("lora_dropout", f"must be in [0, 1), got {config.lora_dropout}")
    check_fraction(config, "validation_fraction")
    for item in dataclasses.fields(config):
        allowed = item.metadata.get("choices")
        if allowed and getattr(config, item.name) not in allowed:
            raise bad(item.name, f"must be one of {', '.join(allowed)}, got {getattr(config, item.name)!r}")
    for name in ("model", "data", "output_dir", "logs_dir", "images_dir", "cache_dir"):
        if not str(getattr(config, name)).strip():
            raise bad(name, "must not be empty")


def check_fraction(config: RunConfig, name: str) -> None:
    """A held-out share is strictly between 0 and 0.5."""
    value = getattr(config, name)
    if not 0 < value < 0.5:
        raise ConfigError(f"{flag_name(name)}: must be between 0 and 0.5, got {value}")


def check_optional_count(config: RunConfig, name: str) -> None:
    """A `--max-*` limit is unset (None) or at least 1."""
    value = getattr(config, name)
    if value is not None and value < 1:
        raise ConfigError(f"{flag_name(name)}: must be at least 1, got {value}")


def config_fields(config_class: type | None = None) -> list[dataclasses.Field]:
    """The fields of a stage's config dataclass (TrainConfig unless another is given)."""
    return list(dataclasses.fields(config_class or TrainConfig))


def run_defining_fields(config_class: type | None = None) -> list[str]:
    """The settings that define a run (marked `run` above): a checkpoint resumes only under the same values."""
    return [item.name for item in config_fields(config_class) if item.metadata.get("run")]


def changed_fields(config: RunConfig) -> set[str]:
    """The settings that differ from their defaults: what a caller that cannot say which it typed has chosen."""
    defaults = type(config)()
    return {
        item.name for item in config_fields(type(config)) if getattr(config, item.name) != getattr(defaults, item.name)
    }


def load_config_file(path: str | Path, config_class: type | None = None) -> dict[str, Any]:
    """Read a JSON object of a stage's config fields (TrainConfig's unless another class is given; names with `_`
    or `-`).

    Raises:
        ConfigError: the file is missing, not JSON, not an object, or names an unknown field.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config: cannot read {path} as JSON: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object of settings")
    known = {f.name for f in config_fields(config_class)}
    normalized = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalized) - known)
    if unknown:
        raise ConfigError(f"--config: {path} has unknown settings: {', '.join(unknown)}")
    return normalized


def build_config(
    file_values: dict[str, Any] | None = None, *, config_class: type | None = None, **overrides: Any
) -> Any:
    """A stage's config (TrainConfig unless another class is given) from file values, then explicit overrides on top
    (flags beat the file).

    Raises:
        ConfigError: a value has the wrong type or fails validation.
    """
    values = {**(file_values or {}), **overrides}
    types = {f.name: f.type for f in config_fields(config_class)}
    for name, value in list(values.items()):
        expected = str(types.get(name, ""))
        if value is None:
            continue
        try:
            if expected.startswith("bool"):
                if not isinstance(value, bool):
                    raise TypeError
            elif expected.startswith("int"):
                if isinstance(value, bool) or float(value) != int(value):
                    raise TypeError
                values[name] = int(value)
            elif expected.startswith("float"):
                values[name] = float(value)
            elif expected.startswith("str"):
                values[name] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag_name(name)}: expected {expected}, got {value!r}") from None
    return (config_class or TrainConfig)(**values)


def read_training_config(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's training_config.json: what gpt2ft recorded when it saved the model ({} for a Hub id, a
    folder gpt2ft did not write, or an unreadable file)."""
    try:
        saved = json.loads((Path(model_dir).expanduser() / TRAINING_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def recorded_start(model_dir: str | Path) -> str | None:
    """The model a gpt2ft folder started from, as its training_config.json records it: a preferred model's
    `started_from`, a fine-tuned model's `config.model`; None when neither is recorded."""
    saved = read_training_config(model_dir)
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    start = saved.get("started_from") or config.get("model")
    return start if isinstance(start, str) and start else None


def saved_run_config(model_dir: str | Path) -> tuple[TrainConfig, int | None]:
    """The settings a saved gpt2ft model was fine-tuned with (and its training window), so evaluation prepares and
    formats the data the same way; the defaults for a model gpt2ft did not train."""
    saved = read_training_config(model_dir)
    try:
        known = {item.name for item in config_fields()}
        values = {key: value for key, value in saved.get("config", {}).items() if key in known}
        return build_config(values), saved.get("max_length")
    except (ValueError, AttributeError, ConfigError):
        return TrainConfig(), None
