"""Fine-tune GPT-2 on conversations with transformers' Trainer: the stages of a run, and `train()` over them.

    python -m gpt2ft train                       # GPT-2 small, DailyDialog from the Hub, defaults for a Colab T4
    python -m gpt2ft train --model ./tiny --data ../shared/data/dailydialog --max-train-dialogs 300 --epochs 1

A run is ten stages, each a function with explicit inputs and outputs; `train()` calls them in order and the
notebook calls them one cell each, passing each result on:

    plan_run -> prepare_data -> resume_point -> load_model_for_training -> tokenize_data -> fit -> evaluate_run
             -> save_run -> publish_run -> finish_run

Every number of a run (tokens, steps, losses, training time) is kept in the Trainer's state, which each checkpoint
stores and a resume restores, so the numbers cover the whole run however often it was interrupted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from . import __version__
from .checkpoints import (
    CheckpointMarkerCallback,
    TrainingError,
    check_output_dir,
    checkpoint_dir,
    clean_stale_folders,
    complete_checkpoints,
    find_resume_checkpoint,
    remove_incomplete_checkpoints,
    save_final_model,
)
from .config import TrainConfig, changed_fields, run_defining_fields
from .data import IGNORE_INDEX, DialogueCollator, PreparedDialogs, prepare_dialogs, tokenize_prepared
from .evaluation import evaluate_loss
from .generate import build_generation_config
from .logs import append_jsonl, write_json, write_jsonl, write_text_atomic
from .loss import use_chunked_loss
from .modeling import (
    Hardware,
    ModelError,
    choose_precision,
    config_context,
    detect_hardware,
    load_model_and_tokenizer,
    load_model_config,
)

TRAIN_LOG = "train_log.jsonl"
SYSTEM_LOG = "system.jsonl"
METRICS = "metrics.json"
NO_BAD_STEP = 2**62  # "no bad step yet", as a step number larger than any run's (the minimum over processes wins)


def say(message: str) -> None:
    """A progress note on stderr (stdout carries the run's one JSON line of metrics)."""
    print(f"gpt2ft: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Whole-run totals, kept in the Trainer's state
# --------------------------------------------------------------------------------------------------------------


class RunTotals(TrainerCallback, ExportableState):
    """Target tokens, the sum of step losses and training seconds of the whole run, across resumes.

    The Trainer writes `state()` into each checkpoint's trainer_state.json and, on resume, builds a new RunTotals
    from it (`restore_callback_states_from_checkpoint`), so the totals continue from the checkpoint's step instead of
    restarting with the process.

    Nothing is read back from the GPU on an ordinary step: each micro-batch's target count, loss and "was it
    finite" stay in device tensors, and are summed over processes and read only at a step where the Trainer logs,
    evaluates, saves or stops, and at the end of each epoch (`flush`). Each read waits for the GPU to finish its
    queued work, so reading every step would keep the GPU idle while Python waits. A NaN or infinite loss is still
    caught, with the step it happened at (kept on the device too), at the next logging step at the latest and
    always before a checkpoint is written, so no checkpoint and no final model holds NaN weights.
    """

    def __init__(self, target_tokens: int = 0, loss_sum: float = 0.0, seconds: float = 0.0) -> None:
        self.target_tokens = int(target_tokens)
        self.loss_sum = float(loss_sum)  # sum of the optimiser steps' losses (each the mean over processes)
        self.seconds = float(seconds)  # training time to the last flushed step's end, evaluations excluded
        self.bad_step: int | None = None
        self._tokens: torch.Tensor | None = None  # target tokens since the last flush (int64, on the device)
        self._losses: torch.Tensor | None = None  # sum of micro-batch losses since the last flush
        self._step_loss: torch.Tensor | None = None  # the current optimiser step's loss, summed over micro-batches
        self._first_bad: torch.Tensor | None = None  # the first step with a non-finite loss since the last flush
        self._bad_gradient: torch.Tensor | None = None  # the current step's gradient norm was not finite
        self._segment_start = time.perf_counter()
        self._segment_base = self.seconds
        self._excluded = 0.0

    def state(self) -> dict[str, Any]:
        return {
            "args": {"target_tokens": self.target_tokens, "loss_sum": self.loss_sum, "seconds": self.seconds},
            "attributes": {},
        }

    def add_gradient_norm(self, norm: torch.Tensor) -> None:
        """A non-finite gradient norm makes the step bad too (a finite loss can still give NaN gradients); not under
        fp16, where the loss scaler skips such a step by design."""
        if torch.is_tensor(norm):
            bad = ~torch.isfinite(norm.detach().float())
            self._bad_gradient = bad if self._bad_gradient is None else self._bad_gradient | bad

    def add(self, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """Count one micro-batch: its target tokens (labels that are not -100 after the shift) and its loss."""
        loss = loss.detach().float()
        targets = (labels[:, 1:] != IGNORE_INDEX).sum().to(loss.device)
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._losses = loss if self._losses is None else self._losses + loss
        self._tokens = targets if self._tokens is None else self._tokens + targets

    def exclude(self, seconds: float) -> None:
        """Leave out time spent evaluating during training."""
        self._excluded += seconds

    def mean_loss(self, steps: int) -> float:
        return self.loss_sum / steps if steps else float("nan")

    def on_train_begin(self, args, state, control, **kwargs):
        self._segment_start, self._segment_base, self._excluded = time.perf_counter(), self.seconds, 0.0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_loss is not None:
            # Still on the device: remember the first step whose loss is not finite (fp16 overflow, too high a
            # learning rate) without asking the host to look.
            step = torch.full((), state.global_step, dtype=torch.int64, device=self._step_loss.device)
            bad = ~torch.isfinite(self._step_loss)
            if self._bad_gradient is not None:
                bad = bad | self._bad_gradient.to(bad.device)
            self._first_bad = (
                torch.where(bad, step, NO_BAD_STEP)
                if self._first_bad is None
                else torch.where(bad, torch.minimum(self._first_bad, step), self._first_bad)
            )
            self._step_loss = self._bad_gradient = None
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.flush(args, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self.flush(args, control)  # epoch-end evaluation and checkpoints are decided after the last step's end
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.flush(args, control)
        return control

    def flush(self, args: TrainingArguments, control: Any) -> None:
        """Read what is pending on the device (the only reads), add it to the totals, and stop after a bad step.

        Called at the same steps on every process; under data parallelism the counts are summed over processes
        and the earliest bad step wins, so all processes count alike and stop together.
        """
        pending = [self._tokens, self._losses, self._first_bad]
        self._tokens = self._losses = self._first_bad = None
        if pending[0] is not None:
            self._add(args, pending)
        if self.bad_step is not None:
            # Stop now, and keep stopping: nothing is evaluated or saved after a bad step (the Trainer's epoch end
            # asks for both again), so the last good checkpoint stays the latest.
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True

    def _add(self, args: TrainingArguments, pending: list) -> None:
        if pending[2] is None:
            pending[2] = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=pending[0].device)
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for value, op in zip(
                pending,
                (torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MIN),
            ):
                torch.distributed.all_reduce(value, op=op)
        tokens, loss, bad = (value.item() for value in pending)
        self.target_tokens += int(tokens)
        self.loss_sum += loss / args.world_size
        self.seconds = self._segment_base + time.perf_counter() - self._segment_start - self._excluded
        if bad != NO_BAD_STEP and self.bad_step is None:
            self.bad_step = int(bad)


class JsonlLogCallback(TrainerCallback):
    """Mirrors the Trainer's log history into `train_log.jsonl` as it grows, on the main process.

    The log history lives in the Trainer's state, so a resumed run gets it back from the checkpoint: the file is
    rewritten from it when training starts, and every step appears once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_jsonl(self.path, state.log_history)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and state.log_history:
            append_jsonl(self.path, state.log_history[-1])
        return control


# --------------------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------------------


class WholeRunTrainer:
    """What gpt2ft adds to a Trainer (DialogueTrainer here, the preference trainers in prefer.py): the whole-run
    totals of RunTotals counted each micro-batch and logged, a non-finite gradient norm caught as a bad step, and no
    checkpoint written after one. Subclasses say which of a batch's positions are targets (`target_labels`)."""

    def __init__(self, *args: Any, precision: str = "fp32", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.precision = precision

    @property
    def run_totals(self) -> RunTotals:
        # Looked up each time: a resume replaces the callback with one rebuilt from the checkpoint.
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RunTotals))

    def target_labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Labels of the batch's positions, -100 where there is no target (RunTotals counts the others)."""
        return inputs["labels"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.run_totals.add(self.target_labels(inputs), loss)
        return loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        if self.precision != "fp16":
            self.run_totals.add_gradient_norm(norm)
        return norm

    def _save_checkpoint(self, model, trial):
        """Bring the whole-run totals up to date before they go into the checkpoint, and never checkpoint weights
        that a bad step has touched (whichever callback asked for the save)."""
        totals = self.run_totals
        totals.flush(self.args, self.control)
        if totals.bad_step is None:
            super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        totals = self.run_totals
        logs = dict(logs)
        if "train_runtime" in logs:
            # The Trainer's closing summary covers this process's segment only; a resumed run needs the whole run's.
            for key in ("train_samples_per_second", "train_steps_per_second"):
                logs.pop(key, None)
            logs.update(train_loss=totals.mean_loss(self.state.global_step), train_runtime=totals.seconds)
        seconds = totals.seconds
        logs.update(
            tokens_seen=totals.target_tokens,
            train_seconds=round(seconds, 3),
            tokens_per_s=totals.target_tokens / seconds if seconds > 0 else 0.0,
        )
        super().log(logs, start_time)


class DialogueTrainer(WholeRunTrainer, Trainer):
    """Trainer with gpt2ft's batches, token-weighted evaluation and whole-run totals (target tokens, loss, time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flop_params: int | None = None

    def get_train_dataloader(self):
        """gpt2ft's batches (DialogueCollator.loader: packed rows, a few fixed shapes, reshuffled each epoch by the
        run's seed), with the Trainer's worker settings, prepared by accelerate (device placement, sharding over
        processes, skipping the batches a resumed run has already trained on)."""
        from functools import partial

        from transformers.trainer_utils import seed_worker

        args = self.args
        workers = args.dataloader_num_workers
        loader = self.data_collator.loader(
            self.train_dataset,
            self._train_batch_size,
            shuffle=True,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index),
        )
        return self.accelerator.prepare(loader)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 x parameters x tokens, as the Trainer counts it, with the parameter count taken once: the Trainer's
        own walks every parameter of the model on every step."""
        if self._flop_params is None:
            model = self.accelerator.unwrap_model(self.model)
            self._flop_params = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
        return 6 * inputs["input_ids"].numel() * self._flop_params

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean NLL per target token over the whole split (not a mean of batch means), in training's precision;
        reduced across processes."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        started = time.perf_counter()
        result = evaluate_loss(
            self.model,
            dataset,
            self.data_collator,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            precision=self.precision,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        runtime = time.perf_counter() - started
        self.run_totals.exclude(runtime)
        metrics = {
            f"{metric_key_prefix}_loss": result["loss"],
            f"{metric_key_prefix}_perplexity": result["perplexity"],
            f"{metric_key_prefix}_tokens": result["tokens"],
            f"{metric_key_prefix}_runtime": round(runtime, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def resolve_optim(config: TrainConfig, hardware: Hardware) -> str:
    if config.optim != "auto":
        return config.optim
    return "adamw_torch_fused" if hardware.device == "cuda" else "adamw_torch"


def build_training_args(
    config: TrainConfig, precision: str, hardware: Hardware, output_dir: str | Path
) -> TrainingArguments:
    """TrainingArguments for a run (`trainer_settings`), with gpt2ft's own batching and optional torch.compile.

    Raises:
        ValueError: the Trainer rejects a setting (an unknown --optim).
    """
    return TrainingArguments(
        **trainer_settings(config, precision, hardware, output_dir),
        remove_unused_columns=False,  # DialogueCollator picks the columns and batches by `length`
        torch_compile=config.compile,
    )


def trainer_settings(config: Any, precision: str, hardware: Hardware, output_dir: str | Path) -> dict[str, Any]:
    """The Trainer settings every gpt2ft stage shares (train's TrainConfig, prefer's PreferConfig): evaluation and
    checkpoints each epoch (or every `eval_steps`), the best model kept, warmup then linear decay, precision and
    optimizer from the hardware, DataLoader workers, and the rules that keep a run's numbers and checkpoints honest."""
    strategy = "steps" if config.eval_steps > 0 else "epoch"
    num_workers = config.num_workers if config.num_workers >= 0 else (2 if hardware.device == "cuda" else 0)
    report_to = (
        [] if config.report_to in ("", "none") else [p.strip() for p in config.report_to.split(",") if p.strip()]
    )
    return dict(
        output_dir=str(output_dir),
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
        logging_nan_inf_filter=False,  # a NaN must reach RunTotals, not be averaged away
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=hardware.device == "cuda",
        dataloader_persistent_workers=num_workers > 0,  # workers start once, not again every epoch
        # Batches go to the GPU from pinned memory without the host waiting for the copy (or for the GPU's queue).
        accelerator_config={"non_blocking": hardware.device == "cuda"},
        # Accelerate sets up multi-process CPU (gloo) data parallelism only when told it runs on CPU; without this a
        # `torchrun` launch on CPU trains N independent copies, each on all the data (world_size 1).
        use_cpu=hardware.device == "cpu",
        activation_checkpointing=config.gradient_checkpointing,
        report_to=report_to,
        # Halving the batch on out-of-memory would silently change the effective batch and the schedule, and under
        # DDP one process's retry hangs the others: gpt2ft stops instead and says which settings fit (oom_message).
        auto_find_batch_size=False,
        restore_callback_states_from_checkpoint=True,  # RunTotals continues from the checkpoint
        ddp_find_unused_parameters=False,
    )


# --------------------------------------------------------------------------------------------------------------
# Stage 1: plan the run (every cheap check, before anything is loaded or written)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """The settled settings of a run and what follows from them."""

    config: TrainConfig  # after the T4 presets
    hardware: Hardware
    precision: str
    precision_reason: str
    preset_notes: list[str]
    max_length: int
    args: TrainingArguments

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def logs_dir(self) -> Path:
        return Path(self.config.logs_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.config.output_dir)

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0


def resolve_max_length(config: TrainConfig, model_config: Any) -> int:
    """The training window: --max-length, or the model's context when 0.

    Raises:
        ModelError: --max-length is above the model's context.
    """
    context = config_context(model_config)
    if config.max_length > context:
        raise ModelError(f"--max-length {config.max_length}: exceeds the model's context of {context} tokens")
    return config.max_length or context


def plan_run(config: TrainConfig, explicit: set[str] | None = None) -> RunPlan:
    """Settle the run's settings and check everything that can be checked cheaply, before the data loads.

    Args:
        config: the settings as given.
        explicit: the settings the user typed (the CLI knows); the T4 presets change only the others. None: the
            settings that differ from the defaults.

    Raises:
        TrainingError, ModelError, ConfigError: with a message naming the setting.
    """
    from .scale import check_optimizer, choose_presets

    check_output_dir(config.output_dir, config.overwrite)
    hardware = detect_hardware()
    config, notes = choose_presets(config, hardware, changed_fields(config) if explicit is None else explicit)
    precision, reason = choose_precision(config.precision, hardware)
    args = check_optimizer(
        resolve_optim(config, hardware),
        lambda: build_training_args(config, precision, hardware, checkpoint_dir(config.output_dir)),
        hardware,
    )
    max_length = resolve_max_length(config, load_model_config(config.model))
    return settle_plan(RunPlan(config, hardware, precision, reason, notes, max_length, args))


def settle_plan(plan: RunPlan) -> RunPlan:
    """The last step of planning any stage: tidy what an interrupted save left beside the output folder (main
    process only) and say which presets were applied."""
    if plan.is_main:
        clean_stale_folders(plan.config.output_dir)
        for note in plan.preset_notes:
            say(note)
    return plan


# --------------------------------------------------------------------------------------------------------------
# Stages 2-4: data, model, tokens
# --------------------------------------------------------------------------------------------------------------


def prepare_data(plan: RunPlan) -> PreparedDialogs:
    """Load, clean, de-duplicate and (for debugging) truncate the dialogues; report skipped lines."""
    with plan.args.main_process_first(desc="preparing the data"):  # under torchrun the others reuse its caches
        prepared = prepare_dialogs(**data_options(plan.config))
    if plan.is_main and prepared.skipped:
        say("skipped while reading the data:")
        for line in prepared.skipped:
            print(f"  {line}", file=sys.stderr)
    return prepared


def data_options(config: TrainConfig) -> dict[str, Any]:
    """prepare_dialogs' arguments from a run's settings (train, prepare, and eval/compare from a saved config)."""
    return dict(
        source=config.data,
        cache_dir=config.cache_dir,
        clean_text=config.clean_text,
        keep_overlap=config.keep_overlap,
        max_train_dialogs=config.max_train_dialogs,
        max_eval_dialogs=config.max_eval_dialogs,
        loss_on=config.loss_on,
        dialog_column=config.dialog_column,
        validation_fraction=config.validation_fraction,
        test_fraction=config.test_fraction,
    )


@dataclass
class LoadedModel:
    model: Any  # GPT-2, or GPT-2 wrapped in LoRA adapters
    tokenizer: Any
    parameter_counts: dict[str, int]


def load_model_for_training(plan: RunPlan) -> LoadedModel:
    """The base model and tokenizer, with LoRA adapters when `--method lora`. The tokenizer gets gpt2ft's chat
    template (the format it trains in), which the saved model then carries."""
    from .chat_format import CHAT_TEMPLATE
    from .scale import apply_method

    model, tokenizer = load_model_and_tokenizer(plan.config.model)
    tokenizer.chat_template = CHAT_TEMPLATE
    model, counts = apply_method(model, plan.config, report=plan.is_main)
    return LoadedModel(model, tokenizer, counts)


def prepare_cache(config: TrainConfig) -> dict[str, Any]:
    """`python -m gpt2ft prepare`: load, clean, split, de-duplicate and tokenise the data into the cache that `train`
    with the same settings reuses, and measure it.

    Returns:
        {"source", "loss_on", per split {"dialogs", "tokens"}, "removed" and "skipped" per split, "seconds",
        "peak_rss_mb"}: what the JSON line holds.
    """
    from .data import column
    from .modeling import load_model_config, load_tokenizer
    from .monitor import SystemMonitor

    started = time.perf_counter()
    with SystemMonitor(None, 0.25, only=("memory",), tree_memory=True) as memory:
        max_length = resolve_max_length(config, load_model_config(config.model))
        prepared = prepare_dialogs(**data_options(config))
        rows = tokenize_prepared(prepared, load_tokenizer(config.model), max_length, config.cache_dir)
        tokens = {split: int(sum(column(rows[split], "length"))) for split in rows}
    return {
        "source": prepared.source,
        "loss_on": prepared.loss_on,
        **{
            split: {"dialogs": len(prepared.dialogs[split]), "tokens": tokens[split], "rows": len(rows[split])}
            for split in rows
        },
        "removed": {split: counts["removed"] for split, counts in prepared.counts.items()},
        "skipped": {split: counts.get("skipped", 0) for split, counts in prepared.counts.items()},
        "max_length": max_length,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(memory.peak_rss_mb, 1),
    }


def tokenize_data(plan: RunPlan, prepared: PreparedDialogs, tokenizer: Any) -> Any:
    """Training rows of every split (cached under the cache folder; built once, by the main process)."""
    with plan.args.main_process_first(desc="tokenising"):
        return tokenize_prepared(prepared, tokenizer, plan.max_length, plan.config.cache_dir, write=plan.is_main)


# --------------------------------------------------------------------------------------------------------------
# Stage 5: fit
# --------------------------------------------------------------------------------------------------------------


def run_settings(plan: RunPlan, prepared: PreparedDialogs) -> dict[str, Any]:
    """What makes a run this run: the run-defining settings (config.py marks them), the optimizer as resolved, the
    training window and how many dialogues each split holds. A checkpoint resumes only under the same values."""
    settings = {name: getattr(plan.config, name) for name in run_defining_fields()}
    settings.update(
        optim=plan.args.optim.value if hasattr(plan.args.optim, "value") else str(plan.args.optim),
        max_length=plan.max_length,
        data_dialogs={split: len(prepared.dialogs[split]) for split in prepared.dialogs},
        loss_on_resolved=prepared.loss_on,
    )
    return settings


@dataclass
class FitResult:
    trainer: DialogueTrainer
    resumed_from: str | None
    monitor: Any = None

    @property
    def totals(self) -> RunTotals:
        return self.trainer.run_totals

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()


def oom_message(plan: RunPlan, evaluating: bool = False) -> str:
    """What to do after running out of GPU memory: the same effective batch in smaller pieces (the largest divisor
    of the batch size below it), or the settings that save memory otherwise."""
    config = plan.config
    where = f"on {plan.hardware.name}"
    if evaluating:
        return f"out of GPU memory {where} while evaluating with --eval-batch-size {config.eval_batch_size}: lower it (the model is trained; run again to resume and evaluate)"
    smaller = next((size for size in range(config.batch_size // 2, 0, -1) if config.batch_size % size == 0), None)
    pieces = (
        f"The same effective batch in smaller pieces usually fits: --batch-size {smaller} --gradient-accumulation-steps "
        f"{config.gradient_accumulation_steps * config.batch_size // smaller}; "
        if smaller
        else "The batch is one dialogue already; "
    )
    return (
        f"out of GPU memory {where} with --batch-size {config.batch_size} x --gradient-accumulation-steps "
        f"{config.gradient_accumulation_steps}. {pieces}--gradient-checkpointing and --method lora save more. "
        "Changed batch settings make a new run (add --resume never)"
    )


def build_trainer(
    plan: RunPlan,
    loaded: LoadedModel,
    rows: Any,
    settings: dict[str, Any],
    callbacks: list[TrainerCallback] | None = None,
) -> DialogueTrainer:
    """The run's Trainer: gpt2ft's batches, the chunked loss (loss.use_chunked_loss), token-weighted evaluation,
    whole-run totals, checkpoint markers and the JSONL log. The model's KV cache is switched off: packed rows stay
    apart only without it (see modeling.without_kv_cache), for every forward the Trainer or the library makes;
    save_run turns it back on."""
    loaded.model.config.use_cache = False
    use_chunked_loss(loaded.model)
    return DialogueTrainer(
        model=loaded.model,
        args=plan.args,
        data_collator=DialogueCollator(loaded.tokenizer, plan.config.batching),
        train_dataset=rows["train"],
        eval_dataset=rows["validation"],
        processing_class=loaded.tokenizer,
        precision=plan.precision,
        callbacks=[
            RunTotals(),
            CheckpointMarkerCallback(settings),
            JsonlLogCallback(plan.logs_dir / TRAIN_LOG),
            *(callbacks or []),
        ],
    )


def resume_point(plan: RunPlan, prepared: PreparedDialogs) -> str | None:
    """The checkpoint this run continues from (`--resume`), checked to belong to the same run; None to start fresh.

    Raises:
        TrainingError: the checkpoint was made with other settings (the message lists them and the ways out).
    """
    if plan.is_main:
        remove_incomplete_checkpoints(plan.checkpoint_dir)
    return find_resume_checkpoint(plan.checkpoint_dir, plan.config.resume, run_settings(plan, prepared))


def fit(
    plan: RunPlan,
    loaded: LoadedModel,
    rows: Any,
    prepared: PreparedDialogs,
    resume_from: str | None,
    callbacks: list[TrainerCallback] | None = None,
) -> FitResult:
    """Train, continuing from `resume_from` (see resume_point) when given.

    The system monitor keeps sampling until `save_run` stops it, so the charts cover the final evaluation.

    Raises:
        TrainingError: out of GPU memory, or a NaN/infinite loss.
    """
    begin_system_log(plan, resume_from)
    trainer = build_trainer(plan, loaded, rows, run_settings(plan, prepared), callbacks)
    return run_trainer(plan, trainer, resume_from)


def begin_system_log(plan: RunPlan, resume_from: str | None) -> None:
    """A fresh run starts a fresh system log; a resumed one goes on with it (the charts show each session apart)."""
    if not plan.is_main:
        return
    system_log = plan.logs_dir / SYSTEM_LOG
    if resume_from:
        say(f"resuming from {resume_from}")
    elif system_log.exists():
        system_log.unlink()


def run_trainer(
    plan: RunPlan,
    trainer: Trainer,
    resume_from: str | None,
    stage: str = "training",
    advice: str = "a lower --learning-rate",
) -> FitResult:
    """`trainer.train()` with the system monitor sampling beside it, and the two ways a run stops turned into one
    clear error each: out of GPU memory, and a NaN or infinite loss (found by RunTotals).

    Raises:
        TrainingError: naming the step, the likely cause and the last good checkpoint.
    """
    from .monitor import SystemMonitor

    monitor = None
    if plan.is_main:
        monitor = SystemMonitor(
            plan.logs_dir / SYSTEM_LOG, plan.config.system_interval_s, step_getter=lambda: trainer.state.global_step
        )
        monitor.start()
    fitted = FitResult(trainer, resume_from, monitor)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError:
        fitted.stop_monitor()
        raise TrainingError(oom_message(plan)) from None
    except BaseException:
        fitted.stop_monitor()
        raise
    bad_step = fitted.totals.bad_step
    if bad_step is not None:
        fitted.stop_monitor()
        kept = complete_checkpoints(plan.checkpoint_dir)
        raise TrainingError(
            f"{stage} stopped at step {bad_step}: the loss became NaN or infinite "
            f"({'fp16 overflow is the usual cause; ' if plan.precision == 'fp16' else ''}"
            f"try {advice}, or --precision fp32/bf16). "
            + (
                f"Last good checkpoint: {kept[-1]} (resume with --resume auto)."
                if kept
                else "No checkpoint was written."
            )
        )
    return fitted


# --------------------------------------------------------------------------------------------------------------
# Stages 6-8: evaluate, save, publish
# --------------------------------------------------------------------------------------------------------------


def evaluate_run(
    plan: RunPlan, fitted: FitResult, loaded: LoadedModel, prepared: PreparedDialogs, rows: Any
) -> dict[str, Any]:
    """Token-weighted loss and perplexity of the trained (best) model on validation and test, with the run's
    whole-run totals from the Trainer's state: the metrics as metrics.json holds them."""
    trainer = fitted.trainer
    try:
        evaluation = {
            **trainer.evaluate(rows["validation"], metric_key_prefix="eval"),
            **trainer.evaluate(rows["test"], metric_key_prefix="test"),
        }
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(oom_message(plan, evaluating=True)) from None
    return {
        **run_facts(plan, fitted, loaded),
        **{
            key: evaluation[key]
            for key in ("eval_loss", "eval_perplexity", "eval_tokens", "test_loss", "test_perplexity")
        },
        "train_dialogs": len(prepared.dialogs["train"]),
        "eval_dialogs": len(prepared.dialogs["validation"]),
        "test_dialogs": len(prepared.dialogs["test"]),
        "train_rows": len(rows["train"]),
        "data_counts": prepared.counts,
        "skipped_lines": prepared.skipped,
        "model": plan.config.model,
    }


def run_facts(plan: RunPlan, fitted: FitResult, loaded: LoadedModel) -> dict[str, Any]:
    """What every stage's metrics.json says about its run: the whole-run totals (RunTotals, across resumes) and how
    it ran (window, method, parameters, precision, device, processes, resume, presets, peak GPU memory)."""
    state, totals = fitted.trainer.state, fitted.totals
    return {
        "train_loss": totals.mean_loss(state.global_step),
        "train_runtime_s": totals.seconds,
        "train_tokens": totals.target_tokens,
        "train_tokens_per_s": totals.target_tokens / totals.seconds if totals.seconds > 0 else 0.0,
        "epochs": state.epoch,
        "steps": state.global_step,
        "max_length": plan.max_length,
        "method": plan.config.method,
        **loaded.parameter_counts,
        "precision": plan.precision,
        "precision_reason": plan.precision_reason,
        "device": plan.hardware.name,
        "world_size": plan.args.world_size,
        "resumed_from": fitted.resumed_from,
        "presets": plan.preset_notes,
        # The caching allocator's high-water mark in this process (training and evaluation), CUDA only.
        "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated(plan.args.device) / 2**20, 1)
        if plan.hardware.device == "cuda"
        else None,
    }


def save_run(
    plan: RunPlan, fitted: FitResult, metrics: dict[str, Any], tokenizer: Any, prepared: PreparedDialogs
) -> Path:
    """Write the model folder atomically (merged, for LoRA), metrics.json and the final train_log.jsonl; free the
    Trainer's optimizer. Only the main process writes; the others wait until it has."""
    from .export import add_n_ctx
    from .scale import merge_for_saving

    fitted.stop_monitor()
    trainer = fitted.trainer
    if plan.is_main:
        write_json(plan.logs_dir / METRICS, metrics)
        write_jsonl(plan.logs_dir / TRAIN_LOG, trainer.state.log_history)
        model, adapter = merge_for_saving(trainer.model, plan.config)
        model.config.use_cache = True  # generation wants its KV cache back
        add_n_ctx(model.config)  # so llama.cpp's own converter works on the folder too
        training_config = {
            "gpt2ft_version": __version__,
            "config": plan.config.to_dict(),
            "max_length": plan.max_length,
            "precision": plan.precision,
            "data_source": prepared.source,
            "data_counts": prepared.counts,
            "data_is_dailydialog": prepared.is_dailydialog,
            "has_roles": prepared.has_roles,
            "loss_on": prepared.loss_on,
            "metrics": {
                k: metrics[k] for k in ("train_loss", "eval_loss", "eval_perplexity", "test_loss", "test_perplexity")
            },
        }
        save_final_model(
            model, tokenizer, build_generation_config(tokenizer), training_config, plan.output_dir, adapter=adapter
        )
    trainer.accelerator.wait_for_everyone()  # every process returns only once the main one has saved the model
    release_trainer(trainer)
    return plan.output_dir


def release_trainer(trainer: DialogueTrainer) -> None:
    """Free the optimizer state and move the trained weights off the GPU: the saved model is what is used next."""
    import gc

    trainer.optimizer = trainer.lr_scheduler = None
    trainer.model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Published:
    """What publish_run made from the saved run; `model` and `tokenizer` are the saved model, loaded from disk."""

    model: Any = None
    tokenizer: Any = None
    charts: list[Path] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    card: Path | None = None
    problems: list[str] = field(default_factory=list)


def attempt(what: str, step: Callable[[], Any], plan: RunPlan, problems: list[str]) -> Any:
    """Run one publishing step; a failure is reported on stderr and recorded, never raised: the model is saved."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 - any failure here must not cost the saved run
        problem = (
            f"{what} failed ({type(error).__name__}: {error}); the model in {plan.output_dir} is saved and complete"
        )
        problems.append(problem)
        say(problem)
        return None


def write_model_card(plan: RunPlan, charts: list[Path], samples: list[dict[str, Any]]) -> Path:
    """The model card (README.md) and its training chart in the saved folder, from metrics.json and
    training_config.json on disk; its metadata is checked by huggingface_hub's ModelCard before it is written."""
    import json
    import shutil

    from huggingface_hub import ModelCard

    from .modelcard import render_model_card

    metrics = json.loads((plan.logs_dir / METRICS).read_text(encoding="utf-8"))
    training_config = json.loads((plan.output_dir / "training_config.json").read_text(encoding="utf-8"))
    chart = next((path for path in charts if Path(path).name == "chart_train.png"), None)
    if chart is not None:
        shutil.copy2(chart, plan.output_dir / Path(chart).name)
    card = ModelCard(render_model_card(metrics, training_config, samples, plan.hardware.name))
    return write_text_atomic(plan.output_dir / "README.md", str(card))


def publish_run(plan: RunPlan, prepared: PreparedDialogs, samples: int = 3) -> Published:
    """Charts, sample replies and the model card, made from what is on disk after the model is safely saved.

    Each step that fails is reported on stderr and skipped: a plotting or card bug never costs a finished run.
    """
    from .charts import write_charts
    from .evaluation import sample_replies
    from .generate import load_for_generation

    published = Published()
    if not plan.is_main:
        return published
    problems = published.problems
    published.charts = (
        attempt("drawing the charts", lambda: write_charts(plan.logs_dir, plan.config.images_dir), plan, problems) or []
    )
    loaded = attempt("loading the saved model", lambda: load_for_generation(str(plan.output_dir)), plan, problems)
    if loaded is not None:
        published.model, published.tokenizer = loaded
        published.samples = (
            attempt(
                "sampling replies",
                lambda: sample_replies(
                    published.model,
                    published.tokenizer,
                    prepared.dialogs["validation"],
                    samples,
                    greedy=True,
                    max_new_tokens=40,
                ),
                plan,
                problems,
            )
            or []
        )
    published.card = attempt(
        "writing the model card", lambda: write_model_card(plan, published.charts, published.samples), plan, problems
    )
    return published


def finish_run(plan: RunPlan) -> None:
    """Delete the run's checkpoints once its model is saved and published (unless --keep-checkpoints)."""
    import shutil

    if plan.is_main and not plan.config.keep_checkpoints:
        shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)


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
    published: Published
    is_main: bool  # this process wrote the files (the only one, or rank 0 under torchrun)


def train(
    config: TrainConfig,
    prepared: PreparedDialogs | None = None,
    callbacks: list[TrainerCallback] | None = None,
    explicit: set[str] | None = None,
) -> TrainResult:
    """Fine-tune, evaluate, save and publish: the whole run, stage by stage.

    Args:
        config: the run's settings.
        prepared: dialogues already loaded.
        callbacks: extra Trainer callbacks (tests use them to interrupt a run).
        explicit: the settings the user typed (see plan_run).

    Returns:
        TrainResult with the final metrics (also written to `logs/metrics.json`).

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input or a stopped run, with a clear message.
    """
    plan = plan_run(config, explicit)
    prepared = prepared or prepare_data(plan)
    resume_from = resume_point(plan, prepared)
    loaded = load_model_for_training(plan)
    rows = tokenize_data(plan, prepared, loaded.tokenizer)
    fitted = fit(plan, loaded, rows, prepared, resume_from, callbacks)
    try:
        metrics = evaluate_run(plan, fitted, loaded, prepared, rows)
    finally:
        fitted.stop_monitor()
    save_run(plan, fitted, metrics, loaded.tokenizer, prepared)
    published = publish_run(plan, prepared)
    finish_run(plan)
    return TrainResult(metrics, plan.output_dir, plan.logs_dir, fitted.resumed_from, prepared, published, plan.is_main)
