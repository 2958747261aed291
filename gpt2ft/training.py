"""Fine-tune GPT-2 on DailyDialog with transformers' Trainer, and save the result atomically.

    python -m gpt2ft train                       # GPT-2 small, DailyDialog from the Hub, defaults for a Colab T4
    python -m gpt2ft train --model ./tiny --data ../shared/data/dailydialog --max-train-dialogs 300 --epochs 1

`train(config)` runs the stages in order: check the output folder -> load and prepare the dialogues -> load the
model -> tokenise -> Trainer.train (resuming from a checkpoint when one exists) -> token-weighted evaluation ->
save model, tokenizer, generation config and training config -> metrics and logs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import __version__
from .config import TrainConfig
from .data import DialogueCollator, PreparedDialogs, prepare_dialogs, tokenize_splits_cached
from .evaluation import evaluate_loss, perplexity
from .generate import build_generation_config
from .modeling import (
    Hardware, ModelError, choose_precision, config_context, detect_hardware, is_main_process, load_model_and_tokenizer, load_model_config,
)

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


class LossGuard:
    """Notices a NaN or infinite training loss. The flag stays on the device until the step ends, and checking it
    once a step costs what the Trainer's own NaN filter costs (one scalar copy)."""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None
        self.bad_step: int | None = None

    def observe(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.flag = bad if self.flag is None else self.flag | bad

    def tripped(self) -> bool:
        if self.flag is None:
            return False
        value = self.flag.int()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(value)  # every process stops together
        return bool(value.item())


class NonFiniteLossCallback(TrainerCallback):
    """Stops training at the end of the first step whose loss is NaN or infinite (fp16 overflow, too high a
    learning rate). Nothing is evaluated or saved after it, so the last good checkpoint stays the latest."""

    def __init__(self, guard: LossGuard) -> None:
        self.guard = guard

    @property
    def bad_step(self) -> int | None:
        return self.guard.bad_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.bad_step is None and self.guard.tripped():
            self.guard.bad_step = state.global_step
        if self.guard.bad_step is not None:
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
        self.loss_guard = LossGuard()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.token_counter.add(inputs["labels"])
        inputs = {**inputs, "use_cache": False}
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self.loss_guard.observe(result[0] if return_outputs else result)
        return result

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
        # Accelerate sets up multi-process CPU (gloo) data parallelism only when told it runs on CPU; without this a
        # `torchrun` launch on CPU trains N independent copies, each on all the data (world_size 1).
        use_cpu=hardware.device == "cpu",
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
        # Under torch.compile, batch lengths are bucketed to multiples of 128 so it compiles a few shapes, not one a step.
        data_collator=DialogueCollator(tokenizer, config.batching, bucket=128 if config.compile else None),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        autocast_dtype=AUTOCAST[precision],
        callbacks=[CheckpointMarkerCallback(), *(extra_callbacks or [])],
    )
    trainer.add_callback(NonFiniteLossCallback(trainer.loss_guard))
    if log_path is not None:
        trainer.add_callback(JsonlLogCallback(log_path, trainer.token_counter))
    return trainer


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


def resolve_max_length(config: TrainConfig, model_config: Any) -> int:
    """The training window: --max-length, or the model's context when 0.

    Raises:
        ModelError: --max-length is above the model's context.
    """
    context = config_context(model_config)
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


def remove_incomplete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Delete checkpoint folders that never finished saving (killed mid-save): they must not be resumed from, and
    the Trainer's checkpoint rotation would otherwise count them."""
    folder = Path(checkpoint_dir)
    complete = set(complete_checkpoints(folder))
    removed = [path for path in folder.glob("checkpoint-*") if path.is_dir() and path not in complete]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by the interrupted run past its last checkpoint), so a resumed
    run's log has no repeated steps."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def checkpoint_step(checkpoint: str) -> int:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def train(
    config: TrainConfig, prepared: PreparedDialogs | None = None, callbacks: list[TrainerCallback] | None = None
) -> TrainResult:
    """Fine-tune, evaluate and save: the whole run.

    Args:
        config: the run's settings.
        prepared: dialogues already loaded (the notebook passes them to avoid loading twice).
        callbacks: extra Trainer callbacks (tests use them to interrupt a run).

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
    if is_main_process():
        for note in preset_notes:
            print(f"gpt2ft: {note}", file=sys.stderr, flush=True)
    precision, precision_reason = choose_precision(config.precision, hardware)
    check_optimizer(resolve_optim(config, hardware), hardware)
    # Everything that can be checked cheaply is checked before the data loads and before any folder is written.
    max_length = resolve_max_length(config, load_model_config(config.model))
    checkpoint_dir = output_dir / CHECKPOINTS
    main = is_main_process()
    if prepared is None:
        prepared = prepare_dialogs(
            config.data, config.cache_dir, config.clean_text, config.keep_overlap, config.max_train_dialogs, config.max_eval_dialogs
        )
    if main and prepared.skipped:
        print(f"gpt2ft: skipped {len(prepared.skipped)} dialogue(s) whose labels do not match their turns:", file=sys.stderr)
        for line in prepared.skipped:
            print(f"  {line}", file=sys.stderr)
    model, tokenizer = load_model_and_tokenizer(config.model)
    rows = tokenize_splits_cached(prepared.dialogs, tokenizer, max_length, config.loss_on, config.cache_dir)
    model, parameter_counts = apply_method(model, config)
    if main:
        remove_incomplete_checkpoints(checkpoint_dir)
    resume_from = find_resume_checkpoint(checkpoint_dir, config.resume)
    log_path = logs_dir / "train_log.jsonl"
    system_path = logs_dir / "system.jsonl"
    if main:
        for log in (log_path, system_path):
            if resume_from is None and log.exists():
                log.unlink()  # a fresh run starts fresh logs
            elif resume_from is not None:
                trim_jsonl(log, checkpoint_step(resume_from))  # a resumed one continues where its checkpoint was
    if main and resume_from:
        print(f"gpt2ft: resuming from {resume_from}", file=sys.stderr)
    trainer = build_trainer(
        config, model, tokenizer, rows["train"], rows["validation"], precision, hardware, checkpoint_dir, log_path=log_path,
        extra_callbacks=callbacks,
    )
    monitor = SystemMonitor(system_path, config.system_interval_s, step_getter=lambda: trainer.state.global_step) if main else None
    started = time.time()
    if monitor:
        monitor.start()
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
        runtime = time.time() - started
        if trainer.loss_guard.bad_step is not None:
            kept = complete_checkpoints(checkpoint_dir)
            raise TrainingError(
                f"training stopped at step {trainer.loss_guard.bad_step}: the loss became NaN or infinite "
                f"({'fp16 overflow is the usual cause; ' if precision == 'fp16' else ''}"
                f"try a lower --learning-rate, or --precision fp32/bf16). "
                + (f"Last good checkpoint: {kept[-1]} (resume with --resume auto)." if kept else "No checkpoint was written.")
            )
        train_tokens = trainer.token_counter.total()
        # Inside the monitored window, so the system log covers the final evaluation too.
        eval_metrics = trainer.evaluate(rows["validation"], metric_key_prefix="eval")
        test_metrics = trainer.evaluate(rows["test"], metric_key_prefix="test")
    finally:
        if monitor:
            monitor.stop()
    # The Trainer adds the loss of the steps after its last log from this process only: average over processes.
    train_loss = trainer.accelerator.reduce(torch.tensor(train_output.training_loss, device=trainer.args.device), "mean").item()
    metrics = {
        "train_loss": train_loss,
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
    trainer.accelerator.wait_for_everyone()  # every process returns only once the main one has saved the model
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
