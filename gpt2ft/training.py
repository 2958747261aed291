"""Fine-tune GPT-2 on DailyDialog with transformers' Trainer, and save the result atomically.

    python -m gpt2ft train                       # GPT-2 small, DailyDialog from the Hub, defaults for a Colab T4
    python -m gpt2ft train --model ./tiny --data ../shared/data/dailydialog --max-train-dialogs 300 --epochs 1

`train(config)` runs the stages in order: check the output folder -> load and prepare the dialogues -> load the
model -> tokenise -> Trainer.train (resuming from a checkpoint when one exists) -> token-weighted evaluation ->
save model, tokenizer, generation config and training config -> metrics and logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .config import TrainConfig
from .data import DialogueCollator, prepare_dialogs, token_stats, tokenize_splits_cached, PreparedDialogs
from .evaluation import evaluate_loss, perplexity
from .generate import build_generation_config
from .modeling import Hardware, ModelError, choose_precision, detect_hardware, load_model_and_tokenizer, model_context

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "gpt2ft_checkpoint_complete"
TRAINING_CONFIG = "training_config.json"
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class TrainingError(RuntimeError):
    """Training cannot start or had to stop; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Output folder: refuse to clobber, write atomically
# --------------------------------------------------------------------------------------------------------------


def is_gpt2ft_output(path: Path) -> bool:
    """True if `path` holds a model written by gpt2ft (or only gpt2ft checkpoints from an interrupted run)."""
    marker = path / TRAINING_CONFIG
    if marker.is_file():
        try:
            return "gpt2ft_version" in json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    # An interrupted run leaves only its checkpoints; the repository's empty artifact folder holds a .gitkeep.
    entries = {entry.name for entry in path.iterdir()}
    return entries <= {CHECKPOINTS, ".gitkeep"}


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that holds something other than a previous gpt2ft model, unless `overwrite`.

    Raises:
        TrainingError: the path is a file, or a folder with foreign content.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not is_gpt2ft_output(path):
        raise TrainingError(
            f"--output-dir {path}: exists and holds files that gpt2ft did not write; choose another folder or pass --overwrite"
        )


def save_final_model(
    model: Any,
    tokenizer: Any,
    generation_config: Any,
    training_config: dict[str, Any],
    output_dir: str | Path,
    extra_text: dict[str, str] | None = None,
    extra_files: list[Path] | None = None,
    adapter: Any = None,
) -> Path:
    """Write model (safetensors), tokenizer, generation_config.json and training_config.json, atomically.

    Everything goes into a hidden sibling folder first; only when all files are written is it swapped in, so an
    interrupted run never leaves a half-written final folder. Checkpoints of the run (in `checkpoints/`) carry over.

    Args:
        extra_text: more files to write, name -> text (the model card README.md).
        extra_files: files to copy in (the training chart the card shows).
        adapter: a PEFT model whose adapter is also saved, under `adapter/`.
    """
    output = Path(output_dir).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        model.generation_config = generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / TRAINING_CONFIG).write_text(json.dumps(training_config, indent=2, default=str) + "\n", encoding="utf-8")
        for name, text in (extra_text or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        for path in extra_files or []:
            shutil.copy2(path, staging / Path(path).name)
        if adapter is not None:
            adapter.save_pretrained(staging / "adapter")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        if output.exists():
            if (output / CHECKPOINTS).is_dir():
                (output / CHECKPOINTS).rename(staging / CHECKPOINTS)
            output.rename(old)
        staging.rename(output)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resuming
# --------------------------------------------------------------------------------------------------------------


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Checkpoints that finished saving (they carry gpt2ft's completion marker), oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for candidate in folder.glob("checkpoint-*"):
        step = candidate.name.rsplit("-", 1)[-1]
        if step.isdigit() and (candidate / COMPLETE_MARKER).is_file() and (candidate / "trainer_state.json").is_file():
            found.append((int(step), candidate))
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(checkpoint_dir: str | Path, resume: str) -> str | None:
    """The checkpoint to resume from: None for 'never', the latest complete one for 'auto', or the given path.

    Raises:
        TrainingError: an explicit path that is not a complete checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_dir)
        return str(found[-1]) if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise TrainingError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return str(path)


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (model, optimizer, RNG, state)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n", encoding="utf-8")
        return control


class NonFiniteLossCallback(TrainerCallback):
    """Stops training when the logged loss is NaN or infinite (fp16 overflow, a too-high learning rate).

    The step is recorded; no checkpoint is written after it, so the last good checkpoint stays the latest.
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, loss
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.bad_step is not None:
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
        return control


@dataclass
class TokenCounter:
    """Target tokens (labels != -100) and token slots (padding included) seen in training on this process."""

    target_tokens: torch.Tensor | None = None
    slot_tokens: int = 0
    started: float = field(default_factory=time.time)

    def add(self, labels: torch.Tensor) -> None:
        count = (labels[:, 1:] != -100).sum()  # stays on the device: no sync in the training loop
        self.target_tokens = count if self.target_tokens is None else self.target_tokens + count
        self.slot_tokens += labels.numel()

    def total(self) -> int:
        if self.target_tokens is None:
            return 0
        value = self.target_tokens.detach().clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(value)
        return int(value.item())


class JsonlLogCallback(TrainerCallback):
    """Appends each Trainer log (loss, learning rate, grad norm, eval loss) to `train_log.jsonl` with tokens seen,
    tokens/s and wall time, on the main process."""

    def __init__(self, path: Path, counter: TokenCounter) -> None:
        self.path = path
        self.counter = counter

    def on_log(self, args, state, control, logs=None, **kwargs):
        tokens = self.counter.total()  # every process must join the all-reduce
        if not state.is_world_process_zero or not logs:
            return control
        elapsed = time.time() - self.counter.started
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "eval_loss" in logs and "eval_perplexity" not in logs:
            record["eval_perplexity"] = perplexity(logs["eval_loss"])
        record.update({"tokens_seen": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "wall_time_s": elapsed})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return control


# --------------------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------------------


class DialogueTrainer(Trainer):
    """Trainer with token-weighted evaluation and a count of the target tokens trained on."""

    def __init__(self, *args: Any, autocast_dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocast_dtype = autocast_dtype
        self.token_counter = TokenCounter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.token_counter.add(inputs["labels"])
        inputs = {**inputs, "use_cache": False}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean NLL per target token over the whole split (not a mean of batch means); reduced across processes."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        started = time.time()
        result = evaluate_loss(
            self.model,
            dataset,
            self.data_collator,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            autocast_dtype=self.autocast_dtype,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        metrics = {
            f"{metric_key_prefix}_loss": result["loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
            f"{metric_key_prefix}_tokens": result["tokens"],
            f"{metric_key_prefix}_runtime": round(time.time() - started, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def resolve_optim(config: TrainConfig, hardware: Hardware) -> str:
    if config.optim != "auto":
        return config.optim
    return "adamw_torch_fused" if hardware.device == "cuda" else "adamw_torch"


def build_training_args(config: TrainConfig, precision: str, hardware: Hardware, checkpoint_dir: str | Path) -> TrainingArguments:
    """TrainingArguments for a run: evaluation and checkpoints each epoch (or every `eval_steps`), the best model
    kept, warmup then linear decay, precision and optimizer from the hardware."""
    strategy = "steps" if config.eval_steps > 0 else "epoch"
    num_workers = config.num_workers if config.num_workers >= 0 else (2 if hardware.device == "cuda" else 0)
    report_to = [] if config.report_to in ("", "none") else [p.strip() for p in config.report_to.split(",") if p.strip()]
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=resolve_optim(config, hardware),
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        tf32=True if hardware.capability and hardware.capability >= (8, 0) else None,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=config.eval_steps or None,
        save_steps=config.eval_steps or None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach NonFiniteLossCallback, not be averaged away
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.batching == "pad" else "random",
        length_column_name="length",
        remove_unused_columns=False,  # DialogueCollator picks the columns; the sampler needs `length`
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=hardware.device == "cuda",
        activation_checkpointing=config.gradient_checkpointing,
        torch_compile=config.compile,
        report_to=report_to,
        auto_find_batch_size=hardware.device == "cuda",
        ddp_find_unused_parameters=False,
    )


def build_trainer(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    train_rows: Any,
    eval_rows: Any,
    precision: str,
    hardware: Hardware,
    checkpoint_dir: str | Path,
    log_path: Path | None = None,
    extra_callbacks: list[TrainerCallback] | None = None,
) -> DialogueTrainer:
    """The Trainer for a run, with gpt2ft's collator, evaluation and callbacks."""
    args = build_training_args(config, precision, hardware, checkpoint_dir)
    trainer = DialogueTrainer(
        model=model,
        args=args,
        data_collator=DialogueCollator(tokenizer, config.batching),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        autocast_dtype=AUTOCAST[precision],
        callbacks=[CheckpointMarkerCallback(), NonFiniteLossCallback(), *(extra_callbacks or [])],
    )
    if log_path is not None:
        trainer.add_callback(JsonlLogCallback(log_path, trainer.token_counter))
    return trainer


def nonfinite_callback(trainer: Trainer) -> NonFiniteLossCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NonFiniteLossCallback))


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    output_dir: Path
    logs_dir: Path
    resumed_from: str | None
    data: PreparedDialogs


def resolve_max_length(config: TrainConfig, model: Any) -> int:
    context = model_context(model)
    if config.max_length > context:
        raise ModelError(f"--max-length {config.max_length}: exceeds the model's context of {context} tokens")
    return config.max_length or context


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, default=str) + "\n")
    return path


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(config: TrainConfig, prepared: PreparedDialogs | None = None) -> TrainResult:
    """Fine-tune, evaluate and save: the whole run.

    Args:
        config: the run's settings.
        prepared: dialogues already loaded (the notebook passes them to avoid loading twice).

    Returns:
        TrainResult with the final metrics (also written to `logs/metrics.json`).

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input or a stopped run, with a clear message.
    """
    from .charts import write_charts
    from .modelcard import render_model_card
    from .monitor import SystemMonitor
    from .scale import apply_method, check_optimizer, choose_presets, merge_for_saving

    output_dir, logs_dir, images_dir = Path(config.output_dir), Path(config.logs_dir), Path(config.images_dir)
    check_output_dir(output_dir, config.overwrite)
    hardware = detect_hardware()
    config, preset_notes = choose_presets(config, hardware)
    for note in preset_notes:
        print(f"gpt2ft: {note}", flush=True)
    precision, precision_reason = choose_precision(config.precision, hardware)
    check_optimizer(resolve_optim(config, hardware), hardware)
    if prepared is None:
        prepared = prepare_dialogs(
            config.data, config.cache_dir, config.clean_text, config.keep_overlap, config.max_train_dialogs, config.max_eval_dialogs
        )
    model, tokenizer = load_model_and_tokenizer(config.model)
    max_length = resolve_max_length(config, model)
    rows = tokenize_splits_cached(prepared.dialogs, tokenizer, max_length, config.loss_on, config.cache_dir)
    model, parameter_counts = apply_method(model, config)
    checkpoint_dir = output_dir / CHECKPOINTS
    resume_from = find_resume_checkpoint(checkpoint_dir, config.resume)
    main = is_main_process()
    log_path = logs_dir / "train_log.jsonl"
    system_path = logs_dir / "system.jsonl"
    if main and resume_from is None:
        for stale in (log_path, system_path):
            if stale.exists():
                stale.unlink()  # a fresh run starts fresh logs; a resumed one appends
    trainer = build_trainer(
        config, model, tokenizer, rows["train"], rows["validation"], precision, hardware, checkpoint_dir, log_path=log_path
    )
    monitor = SystemMonitor(system_path, config.system_interval_s, step_getter=lambda: trainer.state.global_step) if main else None
    started = time.time()
    if monitor:
        monitor.start()
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if monitor:
            monitor.stop()
    guard = nonfinite_callback(trainer)
    if guard.bad_step is not None:
        kept = complete_checkpoints(checkpoint_dir)
        raise TrainingError(
            f"training stopped at step {guard.bad_step}: the loss became {guard.bad_value} "
            f"({'fp16 overflow is the usual cause; ' if precision == 'fp16' else ''}"
            f"try a lower --learning-rate, or --precision fp32/bf16). "
            + (f"Last good checkpoint: {kept[-1]} (resume with --resume auto)." if kept else "No checkpoint was written.")
        )
    runtime = time.time() - started
    train_tokens = trainer.token_counter.total()
    eval_metrics = trainer.evaluate(rows["validation"], metric_key_prefix="eval")
    test_metrics = trainer.evaluate(rows["test"], metric_key_prefix="test")
    metrics = {
        "train_loss": train_output.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "eval_perplexity": eval_metrics["eval_perplexity"],
        "eval_tokens": eval_metrics["eval_tokens"],
        "test_loss": test_metrics["test_loss"],
        "test_perplexity": test_metrics["test_perplexity"],
        "train_runtime_s": runtime,
        "train_tokens": train_tokens,
        "train_tokens_per_s": train_tokens / runtime if runtime > 0 else 0.0,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "train_dialogs": len(prepared.dialogs["train"]),
        "eval_dialogs": len(prepared.dialogs["validation"]),
        "test_dialogs": len(prepared.dialogs["test"]),
        "train_rows": len(rows["train"]),
        "max_length": max_length,
        "method": config.method,
        **parameter_counts,
        "precision": precision,
        "precision_reason": precision_reason,
        "device": hardware.name,
        "world_size": trainer.args.world_size,
        "resumed_from": resume_from,
        "presets": preset_notes,
        "data_counts": prepared.counts,
        "skipped_lines": prepared.skipped,
        "model": config.model,
    }
    if main:
        write_json(logs_dir / "metrics.json", metrics)
        write_jsonl(logs_dir / "log_history.jsonl", trainer.state.log_history)
        charts = write_charts(logs_dir, images_dir)
        final_model, adapter = merge_for_saving(trainer.model, config)
        samples = sample_replies_for_card(final_model, tokenizer, prepared.dialogs["validation"])
        training_config = {
            "gpt2ft_version": __version__,
            "config": config.to_dict(),
            "max_length": max_length,
            "precision": precision,
            "data_source": prepared.source,
            "data_counts": prepared.counts,
            "metrics": {k: metrics[k] for k in ("train_loss", "eval_loss", "eval_perplexity", "test_loss", "test_perplexity")},
        }
        card = render_model_card(metrics, training_config, samples, hardware_name=hardware.name)
        train_chart = next((path for path in charts if path.name == "chart_train.png"), None)
        save_final_model(
            final_model, tokenizer, build_generation_config(tokenizer), training_config, output_dir,
            extra_text={"README.md": card}, extra_files=[train_chart] if train_chart else [], adapter=adapter,
        )
        if not config.keep_checkpoints:
            shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
    return TrainResult(metrics=metrics, output_dir=output_dir, logs_dir=logs_dir, resumed_from=resume_from, data=prepared)


def sample_replies_for_card(model: Any, tokenizer: Any, dialogs: Any, count: int = 3) -> list[dict[str, Any]]:
    """A few greedy replies to held-out openings, for the model card."""
    from .generate import generate_reply

    samples = []
    for turns in dialogs["dialog"][:count]:
        context = list(turns[:1])
        reply = generate_reply(model, tokenizer, context, greedy=True, max_new_tokens=40)
        samples.append({"context": context, "reference": turns[1] if len(turns) > 1 else "", "reply": reply.text})
    return samples
