"""The run library every stage shares: a stage (train, prefer, ...) is a module of its own parts, and `run_stage`
runs any of them the same way.

    python -m gpt2ft train ...      # training.TRAIN through run_stage
    python -m gpt2ft prefer ...     # prefer.PREFER through run_stage

What lives here is what makes a gpt2ft run a gpt2ft run, whatever it trains: settling the settings before anything
loads (`plan_stage`: output folder, T4 presets, precision, optimizer, training window), whole-run numbers that
survive resumes (`RunTotals`, kept in the Trainer's state), the Trainer mixin that counts them and never
checkpoints after a NaN (`WholeRunTrainer`), the Trainer settings every stage shares (`trainer_settings`), resuming
only the same run (`resume_point`), running the Trainer with NaN and out-of-memory turned into one clear line
(`fit`), the facts every metrics.json holds (`run_facts`), the atomic save (`save_stage`), and the charts, samples
and model card made from what is on disk afterwards (`publish_stage`).

A stage supplies its own parts through `Stage` (see its docstring): its plan, data, model, rows, Trainer,
measurements, metrics, saved record, model card, charts and samples. Adding a stage is one module that builds a
`Stage` from its functions, plus one row in the CLI's table of stages (cli.STAGES).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, ProgressCallback

from . import __version__
from .checkpoints import (
    CheckpointMarkerCallback,
    TrainingError,
    check_output_dir,
    checkpoint_dir,
    clean_stale_folders,
    complete_checkpoints,
    find_resume_checkpoint,
    folder_bytes,
    remove_incomplete_checkpoints,
    save_final_model,
    tensor_bytes,
)
from .config import RunConfig, changed_fields, run_defining_fields
from .data import IGNORE_INDEX
from .errors import UnchangedWeightsError
from .export import add_n_ctx
from .generate import build_generation_config, load_for_generation
from .logs import append_jsonl, space_for, write_json, write_jsonl, write_text_atomic
from .memory import check_memory
from .modeling import (
    Hardware,
    ModelError,
    choose_precision,
    config_context,
    detect_hardware,
    load_model_config,
    training_window,
)
from .monitor import SystemMonitor
from .scale import bitsandbytes_installed, check_optimizer, choose_presets, merge_for_saving, settle_lora_targets

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"
SYSTEM_LOG = "system.jsonl"
METRICS = "metrics.json"
NO_BAD_STEP = 2**62  # "no bad step yet", as a step number larger than any run's (the minimum over processes wins)


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
            if self._first_bad is None:
                self._first_bad = torch.where(bad, step, NO_BAD_STEP)
            else:
                self._first_bad = torch.where(bad, torch.minimum(self._first_bad, step), self._first_bad)
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
            ops = (torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.MIN)
            for value, op in zip(pending, ops):
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
# The learning-rate schedule, and whether the weights moved at all
# --------------------------------------------------------------------------------------------------------------

# Warm-up takes at most this share of a run's steps: a run of a few steps (a handful of votes) must spend most of
# them learning, not warming up.
MAX_WARMUP_SHARE = 0.25
# Elements of each trainable tensor remembered at the start: enough to see any real update (AdamW moves nearly every
# element of a tensor it updates), a few MB in all even for a 1B model.
WEIGHT_SAMPLE = 4096
# A sampled element that moved less than this has not moved: AdamW's first step moves an element by about the
# learning rate (5e-5 by default, rarely below 1e-6), while 1e-7 is an fp32 weight's own rounding near 1.
WEIGHTS_TOLERANCE = 1e-7


def capped_warmup(total_steps: int, warmup: float) -> int:
    """Warm-up steps of a run of `total_steps`: `warmup` as a share of the run (below 1) or as steps, at most
    MAX_WARMUP_SHARE of the run, so warm-up never takes all of a short run's steps."""
    requested = int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)
    return max(0, min(requested, int(total_steps * MAX_WARMUP_SHARE)))


def warm_then_decay(step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at `step` (0-based): a linear rise that starts one step in rather than at 0
    (transformers' linear schedule gives its first step a learning rate of 0, so a one-step run learns nothing),
    then linear decay that reaches 0 after the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass(frozen=True)
class WeightSample:
    """A fixed random sample of every trainable tensor's elements, as they were when the run started."""

    positions: dict[str, torch.Tensor]  # parameter name -> flat indices (CPU)
    values: dict[str, torch.Tensor]  # parameter name -> the values there (CPU, fp32)


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


@torch.no_grad()
def sample_weights(model: Any, per_tensor: int = WEIGHT_SAMPLE, seed: int = 0) -> WeightSample:
    """Remember `per_tensor` elements of each trainable tensor of `model` (weight_change compares them later)."""
    generator = torch.Generator().manual_seed(seed)
    positions, values = {}, {}
    for name, parameter in trainable(model).items():
        flat = parameter.detach().reshape(-1)
        index = torch.randint(0, flat.numel(), (min(per_tensor, flat.numel()),), generator=generator)
        positions[name] = index
        values[name] = flat[index.to(flat.device)].float().cpu()
    return WeightSample(positions, values)


@torch.no_grad()
def weight_change(model: Any, sample: WeightSample) -> float:
    """The largest change of a sampled element since `sample` was taken (0.0: nothing sampled moved)."""
    parameters = dict(model.named_parameters())
    largest = 0.0
    for name, index in sample.positions.items():
        if name not in parameters:
            continue
        flat = parameters[name].detach().reshape(-1)
        now = flat[index.to(flat.device)].float().cpu()
        largest = max(largest, float((now - sample.values[name]).abs().max()))
    return largest


def log_line(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """One console line for a Trainer log: `step 10/40: loss 2.312, learning_rate 5e-05, ...`."""
    shown = [
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in logs.items()
        if key != "total_flos"
    ]
    return f"step {step}/{max_steps}: " + ", ".join(shown)


class ConsoleProgressCallback(ProgressCallback):
    """transformers' progress bar, with each log as a plain line rather than a Python dict: stdout's only line that
    starts with `{` is then the command's final JSON, which a script can take as it is."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(log_line(state.global_step, state.max_steps, logs))


class WholeRunTrainer:
    """What gpt2ft adds to a Trainer (training.DialogueTrainer; TRL's DPO and KTO trainers in prefer.py): the
    whole-run totals of RunTotals counted each micro-batch and logged, a non-finite gradient norm caught as a bad
    step, and no checkpoint written after one. Subclasses say which of a batch's positions are targets
    (`target_labels`).

    The learning rate follows warm_then_decay (create_scheduler): warm-up capped at a share of the run and never a
    step at learning rate 0. A checkpoint whose weights still equal the start (`start_weights`, set by `fit`) is
    never taken for the best one.

    Five of the Trainer's hooks here are private methods, because the Trainer has no public one for them:
    `_clip_grad_norm` is the only place the step's gradient norm exists as a tensor (callbacks get it as a float,
    read from the GPU), `_save_checkpoint` is where every save goes, whichever callback asked for it,
    `_issue_warnings_after_load` is where loading the best checkpoint back reports keys, and `_run_epoch` is the
    only place before a resumed epoch's first step (a callback's stop is read only after a step), and
    `_determine_best_metric` is where an evaluation is taken for the best so far. tests/test_runs.py
    pins them (they exist, are called as relied on, and take what is passed).
    """

    def __init__(self, *args: Any, precision: str = "fp32", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.precision = precision
        self.start_weights: WeightSample | None = None
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ConsoleProgressCallback)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            warmup = capped_warmup(num_training_steps, self.args.warmup_steps)
            schedule = partial(warm_then_decay, warmup=warmup, total=num_training_steps)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, schedule)
            self._created_lr_scheduler = True  # the Trainer rebuilds its own scheduler on a second train() call
        return self.lr_scheduler

    def weights_moved(self) -> bool:
        """Whether the weights differ from the start (True when there is nothing to compare with)."""
        if self.start_weights is None:
            return True
        return weight_change(self.accelerator.unwrap_model(self.model), self.start_weights) > WEIGHTS_TOLERANCE

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """An evaluation of weights that have not moved yet (every step so far at a learning rate too small, or
        skipped by fp16's loss scaler) is the starting model's, and never the best checkpoint."""
        if not self.weights_moved():
            return False
        return super()._determine_best_metric(metrics, trial)

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
        that a bad step has touched (whichever callback asked for the save). A full disk is one line (DiskFullError)
        naming the folder and the space a checkpoint needs; the half-written checkpoint is removed, the complete ones
        stay."""
        totals = self.run_totals
        totals.flush(self.args, self.control)
        if totals.bad_step is None:
            folder = Path(self.args.output_dir)
            kept = complete_checkpoints(folder)
            with space_for(
                folder,
                lambda: folder_bytes(kept[-1]) if kept else self.checkpoint_bytes(),
                f"checkpoint-{self.state.global_step}",
                kept=f"the last complete checkpoint, {kept[-1].name}, is kept" if kept else "",
                cleanup=lambda: remove_incomplete_checkpoints(folder),
            ):
                super()._save_checkpoint(model, trial)

    def checkpoint_bytes(self) -> int:
        """What a checkpoint holds, about: the weights and the optimizer's state (Adam: two tensors a weight)."""
        weights = tensor_bytes(self.accelerator.unwrap_model(self.model))
        moments = 0
        for state in getattr(self.optimizer, "state", {}).values():
            moments += sum(value.numel() * value.element_size() for value in state.values() if torch.is_tensor(value))
        return weights + moments

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """No step once the run has made all of its steps. A run killed while saving its model resumes from the
        checkpoint of its last step; when that step falls mid-epoch, the Trainer resumes inside that epoch and takes
        a step before it compares the step count with max_steps, so the resumed run would train one step more than
        the uninterrupted one (and one more after every further kill)."""
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The best checkpoint comes back without a tied output layer (saved once, as the input embedding, and tied
        again): that is no missing key, and warning of it would only alarm the user."""
        tied = tied_parameter_names(self.accelerator.unwrap_model(self.model))
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)

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


def tied_parameter_names(model: Any) -> set[str]:
    """The names of parameters that share their tensor with another (GPT-2's and SmolLM2's lm_head.weight is the
    token embedding)."""
    seen: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        seen.setdefault(parameter.data_ptr(), []).append(name)
    return {name for names in seen.values() if len(names) > 1 for name in names}


def run_callbacks(plan: RunPlan, settings: dict[str, Any], extra: Sequence[TrainerCallback] | None) -> list[Any]:
    """The callbacks every stage's Trainer gets: the whole-run totals, the checkpoint marker (recording what makes
    the run this run), the JSONL log, then the caller's own (tests use them to interrupt a run)."""
    return [
        RunTotals(),
        CheckpointMarkerCallback(settings),
        JsonlLogCallback(plan.logs_dir / TRAIN_LOG),
        *(extra or []),
    ]


# --------------------------------------------------------------------------------------------------------------
# Trainer settings every stage shares
# --------------------------------------------------------------------------------------------------------------


def resolve_optim(config: RunConfig, hardware: Hardware) -> str:
    if config.optim != "auto":
        return config.optim
    return "adamw_torch_fused" if hardware.device == "cuda" else "adamw_torch"


def trainer_settings(config: RunConfig, precision: str, hardware: Hardware, output_dir: str | Path) -> dict[str, Any]:
    """The Trainer settings every gpt2ft stage shares: evaluation and checkpoints each epoch (or every
    `eval_steps`), the best model kept, warmup then linear decay, precision and optimizer from the hardware,
    DataLoader workers, and the rules that keep a run's numbers and checkpoints honest."""
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
# The plan: every cheap check, before anything is loaded or written
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """The settled settings of a run and what follows from them."""

    config: RunConfig  # the stage's config (TrainConfig, PreferConfig, ...), after the T4 presets
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


def resolve_max_length(config: RunConfig, model_config: Any) -> int:
    """The training window: --max-length, or the model's context capped at modeling.TRAINING_WINDOW when 0.

    Raises:
        ModelError: --max-length is above the model's context.
    """
    context = config_context(model_config)
    if config.max_length > context:
        raise ModelError(f"--max-length {config.max_length}: exceeds the model's context of {context} tokens")
    return config.max_length or training_window(model_config)


ArgsBuilder = Callable[[RunConfig, str, Hardware, Path, int], TrainingArguments]


def plan_stage(
    config: RunConfig, explicit: set[str] | None, build_args: ArgsBuilder, keep: Sequence[str] = ()
) -> RunPlan:
    """Settle a stage's settings and check everything that can be checked cheaply, before the data loads: the
    output folder, the model's config and training window, the T4 presets (by its parameter count), the LoRA
    targets, the precision, the optimizer (built once to fail fast) and, on CUDA, the memory estimate (refused in
    one line, with what fits, when the GPU is too small). Then tidy what an interrupted save left beside the output
    folder and say which presets were applied and what the run should take.

    Args:
        config: the settings as given.
        explicit: the settings the user typed (the CLI knows); the T4 presets change only the others. None: the
            settings that differ from the defaults.
        build_args: the stage's TrainingArguments (or TRL config) from (config, precision, hardware, checkpoint
            folder, training window).
        keep: settings the presets never change for this stage.

    Raises:
        TrainingError, ModelError, ConfigError: with a message naming the setting.
    """
    check_output_dir(config.output_dir, config.overwrite)
    hardware = detect_hardware()
    # The model's config first (no weights): the presets go by its parameter count, the estimate by its shape.
    model_config = load_model_config(config.model)
    max_length = resolve_max_length(config, model_config)
    typed = changed_fields(config) if explicit is None else explicit
    config, notes = choose_presets(config, hardware, typed, keep, model_config=model_config, max_length=max_length)
    config = settle_lora_targets(config, model_config)
    precision, reason = choose_precision(config.precision, hardware)
    folder = checkpoint_dir(config.output_dir)
    optim = resolve_optim(config, hardware)
    args = check_optimizer(optim, lambda: build_args(config, precision, hardware, folder, max_length), hardware)
    memory = check_memory(config, model_config, hardware, precision, max_length, optim, bitsandbytes_installed())
    plan = RunPlan(config, hardware, precision, reason, notes, max_length, args)
    if plan.is_main:
        clean_stale_folders(config.output_dir)
        for note in [*notes, memory] if memory else notes:
            logger.info(note)
    return plan


def base_run_settings(plan: RunPlan) -> dict[str, Any]:
    """What makes any run this run: the stage's run-defining settings (config.py marks them), the optimizer as
    resolved and the training window. A stage adds what its data contributes."""
    settings = {name: getattr(plan.config, name) for name in run_defining_fields(type(plan.config))}
    settings.update(
        optim=plan.args.optim.value if hasattr(plan.args.optim, "value") else str(plan.args.optim),
        max_length=plan.max_length,
    )
    return settings


def resume_point(plan: RunPlan, settings: dict[str, Any]) -> str | None:
    """The checkpoint this run continues from (`--resume`), checked to belong to the same run; None to start fresh.
    Checkpoints a kill left half-written are removed first (main process).

    Raises:
        TrainingError: the checkpoint was made with other settings (the message lists them and the ways out).
    """
    if plan.is_main:
        remove_incomplete_checkpoints(plan.checkpoint_dir)
    return find_resume_checkpoint(plan.checkpoint_dir, plan.config.resume, settings, type(plan.config))


# --------------------------------------------------------------------------------------------------------------
# Fit: the Trainer, with NaN and out-of-memory turned into one clear line
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any  # the model being tuned (wrapped in LoRA adapters, for --method lora)
    tokenizer: Any
    parameter_counts: dict[str, int]


@dataclass
class FitResult:
    trainer: Any
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
        return (
            f"out of GPU memory {where} while evaluating with --eval-batch-size {config.eval_batch_size}: lower it "
            "(the model is trained; run again to resume and evaluate)"
        )
    smaller = next((size for size in range(config.batch_size // 2, 0, -1) if config.batch_size % size == 0), None)
    pieces = (
        f"The same effective batch in smaller pieces usually fits: --batch-size {smaller} "
        f"--gradient-accumulation-steps {config.gradient_accumulation_steps * config.batch_size // smaller}; "
        if smaller
        else "The batch is one dialogue already; "
    )
    return (
        f"out of GPU memory {where} with --batch-size {config.batch_size} x --gradient-accumulation-steps "
        f"{config.gradient_accumulation_steps}. {pieces}--gradient-checkpointing and --method lora save more. "
        "Changed batch settings make a new run (add --resume never)"
    )


def begin_system_log(plan: RunPlan, resume_from: str | None) -> None:
    """A fresh run starts a fresh system log; a resumed one goes on with it (the charts show each session apart)."""
    if not plan.is_main:
        return
    system_log = plan.logs_dir / SYSTEM_LOG
    if resume_from:
        logger.info(f"resuming from {resume_from}")
    elif system_log.exists():
        system_log.unlink()


def fit(
    plan: RunPlan,
    trainer: Trainer,
    resume_from: str | None,
    stage: str = "training",
    advice: str = "a lower --learning-rate",
) -> FitResult:
    """`trainer.train()` with the system monitor sampling beside it (until save_stage stops it, so the charts cover
    the final evaluation), and the two ways a run stops turned into one clear error each: out of GPU memory, and a
    NaN or infinite loss (found by RunTotals).

    Raises:
        TrainingError: naming the step, the likely cause and the last good checkpoint.
    """
    begin_system_log(plan, resume_from)
    monitor = None
    if plan.is_main:
        monitor = SystemMonitor(
            plan.logs_dir / SYSTEM_LOG, plan.config.system_interval_s, step_getter=lambda: trainer.state.global_step
        )
        monitor.start()
    fitted = FitResult(trainer, resume_from, monitor)
    # Before train(): a resumed run loads its checkpoint inside it, so this is the starting model's weights.
    trainer.start_weights = sample_weights(trainer.accelerator.unwrap_model(trainer.model))
    try:
        with warnings.catch_warnings():
            # PEFT and TRL still call transformers' deprecated is_gradient_checkpointing: not the user's to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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


def run_facts(plan: RunPlan, fitted: FitResult, loaded: LoadedModel) -> dict[str, Any]:
    """What every stage's metrics.json says about its run: the whole-run totals (RunTotals, across resumes) and how
    it ran (window, method, parameters, precision, device, processes, resume, presets, peak GPU memory)."""
    state, totals = fitted.trainer.state, fitted.totals
    start = fitted.trainer.start_weights
    change = (
        weight_change(fitted.trainer.accelerator.unwrap_model(fitted.trainer.model), start)
        if start is not None
        else None
    )
    peak = torch.cuda.max_memory_allocated(plan.args.device) / 2**20 if plan.hardware.device == "cuda" else None
    return {
        "train_loss": totals.mean_loss(state.global_step),
        "train_runtime_s": totals.seconds,
        "train_tokens": totals.target_tokens,
        "train_tokens_per_s": totals.target_tokens / totals.seconds if totals.seconds > 0 else 0.0,
        # The weights as saved (the best checkpoint's) beside the starting model's, on a sample of every tensor.
        "weights_changed": change is None or change > WEIGHTS_TOLERANCE,
        "weights_max_change": change,
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
        "peak_gpu_allocated_mb": round(peak, 1) if peak is not None else None,
    }


UNCHANGED_ADVICE = (
    "every update was too small to move them: a higher --learning-rate, more --epochs or more data (or "
    "--allow-unchanged to accept it)"
)


def unchanged_line(metrics: dict[str, Any], saved: str = "model") -> str | None:
    """The warning for a run whose saved weights equal the starting model's, or None."""
    if metrics.get("weights_changed", True):
        return None
    return (
        f"the saved {saved} equals the starting model (after {metrics.get('steps', 0)} steps, no sampled weight moved "
        f"by more than {WEIGHTS_TOLERANCE:g}): {UNCHANGED_ADVICE}"
    )


def check_weights_changed(plan: RunPlan, metrics: dict[str, Any]) -> None:
    """Refuse, after the save, a run that left the weights as they started, unless --allow-unchanged.

    Raises:
        UnchangedWeightsError: naming the steps and what to change (the model is saved: nothing is lost).
    """
    line = unchanged_line(metrics)
    if line and not plan.config.allow_unchanged:
        raise UnchangedWeightsError(line + f"; it was saved to {plan.output_dir} all the same")


def gain_lines(metrics: dict[str, Any]) -> list[str]:
    """What training gained on the held-out splits, one line a split: the starting model's loss, perplexity and bits
    per byte (base_*) beside the trained model's."""
    lines = []
    for prefix, split in (("eval", "validation"), ("test", "test")):
        if metrics.get(f"base_{prefix}_loss") is None or metrics.get(f"{prefix}_loss") is None:
            continue
        parts = []
        for key, label, digits in (
            ("loss", "loss", 4),
            ("perplexity", "perplexity", 2),
            ("bits_per_byte", "bits/byte", 3),
        ):
            before, after = metrics.get(f"base_{prefix}_{key}"), metrics.get(f"{prefix}_{key}")
            if before is not None and after is not None:
                parts.append(f"{label} {before:.{digits}f} -> {after:.{digits}f}")
        lines.append(f"{split}: " + ", ".join(parts) + " (the starting model -> the trained one)")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Save, publish, finish
# --------------------------------------------------------------------------------------------------------------


def save_stage(
    plan: RunPlan, fitted: FitResult, metrics: dict[str, Any], tokenizer: Any, record: dict[str, Any]
) -> Path:
    """Write metrics.json, the final train_log.jsonl and the model folder atomically (merged, for LoRA; with the
    tokenizer, its chat template, the decoding defaults and `record` as training_config.json); then free the
    Trainer. Only the main process writes; the others wait until it has.

    Args:
        record: what the stage records about the run (training_config.json); gpt2ft's version is added.
    """
    fitted.stop_monitor()
    trainer = fitted.trainer
    if plan.is_main:
        write_json(plan.logs_dir / METRICS, metrics)
        write_jsonl(plan.logs_dir / TRAIN_LOG, trainer.state.log_history)
        model, adapter = merge_for_saving(trainer.model, plan.config)
        model.config.use_cache = True  # generation wants its KV cache back
        add_n_ctx(model.config)  # so llama.cpp's own converter works on the folder too
        training_config = {"gpt2ft_version": __version__, **record}
        generation = build_generation_config(tokenizer)
        save_final_model(model, tokenizer, generation, training_config, plan.output_dir, adapter=adapter)
    trainer.accelerator.wait_for_everyone()  # every process returns only once the main one has saved the model
    release_trainer(trainer)
    return plan.output_dir


def release_trainer(trainer: Any) -> None:
    """Free the optimizer state (and a preference trainer's frozen reference copy) and move the trained weights off
    the GPU: the saved model is what is used next."""
    trainer.optimizer = trainer.lr_scheduler = None
    if getattr(trainer, "ref_model", None) is not None:
        trainer.ref_model = None
    trainer.model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Published:
    """What publish_stage made from the saved run; `model` and `tokenizer` are the saved model, loaded from disk."""

    model: Any = None
    tokenizer: Any = None
    charts: list[Path] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    card: Path | None = None
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # what the saved model was measured for (evaluate_saved)


def attempt(what: str, step: Callable[[], Any], plan: RunPlan, problems: list[str]) -> Any:
    """Run one publishing step; a failure is reported on stderr and recorded, never raised: the model is saved."""
    try:
        return step()
    except Exception as error:  # noqa: BLE001 - any failure here must not cost the saved run
        problem = (
            f"{what} failed ({type(error).__name__}: {error}); the model in {plan.output_dir} is saved and complete"
        )
        problems.append(problem)
        logger.info(problem)
        return None


CardRenderer = Callable[[dict[str, Any], dict[str, Any], list[dict[str, Any]], str], str]


def write_card(
    plan: RunPlan,
    render: CardRenderer,
    charts: Sequence[Path],
    samples: list[dict[str, Any]],
    card_charts: Sequence[str],
) -> Path:
    """The model card (README.md) and the charts it shows, in the saved folder, from metrics.json and
    training_config.json on disk; its metadata is checked by huggingface_hub's ModelCard before it is written.

    Args:
        render: the stage's card, from (metrics, training_config, samples, hardware name).
        card_charts: the file names of the charts the card shows.
    """
    metrics = json.loads((plan.logs_dir / METRICS).read_text(encoding="utf-8"))
    training_config = json.loads((plan.output_dir / "training_config.json").read_text(encoding="utf-8"))
    for chart in charts:
        if Path(chart).name in card_charts:
            shutil.copy2(chart, plan.output_dir / Path(chart).name)
    card = ModelCard(render(metrics, training_config, samples, plan.hardware.name))
    return write_text_atomic(plan.output_dir / "README.md", str(card))


def publish_stage(plan: RunPlan, stage: Stage, data: Any) -> Published:
    """The stage's charts, sample replies of the saved model and the model card, made from what is on disk after
    the model is safely saved. Each step that fails is reported on stderr and skipped: a plotting or card bug never
    costs a finished run."""
    published = Published()
    if not plan.is_main:
        return published
    problems = published.problems
    loaded = attempt("loading the saved model", lambda: load_for_generation(str(plan.output_dir)), plan, problems)
    if loaded is not None:
        published.model, published.tokenizer = loaded
        measured = attempt(
            "measuring the saved model", lambda: stage.evaluate_saved(plan, published, data), plan, problems
        )
        if measured:
            published.metrics = measured
            path = plan.logs_dir / METRICS
            write_json(path, {**json.loads(path.read_text(encoding="utf-8")), **measured})
    published.charts = attempt("drawing the charts", lambda: stage.charts(plan), plan, problems) or []
    if loaded is not None:
        published.samples = (
            attempt(
                "sampling replies", lambda: stage.samples(published.model, published.tokenizer, data), plan, problems
            )
            or []
        )
    published.card = attempt(
        "writing the model card",
        lambda: write_card(plan, stage.card, published.charts, published.samples, stage.card_charts),
        plan,
        problems,
    )
    return published


def finish_run(plan: RunPlan) -> None:
    """Delete the run's checkpoints once its model is saved and published (unless --keep-checkpoints)."""
    if plan.is_main and not plan.config.keep_checkpoints:
        shutil.rmtree(plan.checkpoint_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# A stage, and running one
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """The parts of one stage, each a function of the stage's own module; `run_stage` calls them in this order.

    plan(config, explicit) -> RunPlan                   settle the settings (plan_stage does the shared work)
    prepare(plan) -> data                               read and check the stage's data
    load(plan) -> LoadedModel                           the model to tune and its tokenizer
    rows(plan, data, tokenizer) -> rows                 the splits the Trainer reads
    settings(plan, data, rows) -> dict                  what makes this run this run (base_run_settings + data)
    trainer(plan, loaded, rows, data, settings, callbacks) -> Trainer   a WholeRunTrainer, with run_callbacks
    baseline(plan, trainer, loaded, data, rows) -> measurement          the model before training (default: none)
    measure(plan, trainer, loaded, data, rows, baseline) -> measurement the trained model
    metrics(plan, fitted, loaded, data, rows, baseline, after) -> dict  metrics.json (run_facts + the stage's own)
    record(plan, data, metrics) -> dict                 what training_config.json records beside the model
    card(metrics, training_config, samples, hardware) -> str            the model card's text
    charts(plan) -> [Path]                              the charts, drawn from the logs on disk
    samples(model, tokenizer, data) -> [dict]           a few replies of the saved model for the card
    evaluate_saved(plan, published, data) -> dict       what the saved model is measured for after the save, added to
                                                        metrics.json before the charts and card (default: nothing)
    """

    name: str
    plan: Callable[[Any, set[str] | None], RunPlan]
    prepare: Callable[[RunPlan], Any]
    load: Callable[[RunPlan], LoadedModel]
    rows: Callable[[RunPlan, Any, Any], Any]
    settings: Callable[[RunPlan, Any, Any], dict[str, Any]]
    trainer: Callable[..., Any]
    measure: Callable[..., Any]
    metrics: Callable[..., dict[str, Any]]
    record: Callable[[RunPlan, Any, dict[str, Any]], dict[str, Any]]
    card: CardRenderer
    charts: Callable[[RunPlan], list[Path]]
    samples: Callable[[Any, Any, Any], list[dict[str, Any]]]
    baseline: Callable[..., Any] = lambda plan, trainer, loaded, data, rows: None
    evaluate_saved: Callable[..., dict[str, Any] | None] = lambda plan, published, data: None
    card_charts: tuple[str, ...] = ("chart_train.png",)
    stopped: str = "training"  # how the NaN message names the stage
    nan_advice: str = "a lower --learning-rate"


@dataclass
class RunResult:
    metrics: dict[str, Any]
    output_dir: Path
    logs_dir: Path
    resumed_from: str | None
    data: Any
    published: Published
    is_main: bool  # this process wrote the files (the only one, or rank 0 under torchrun)


def run_stage(
    stage: Stage,
    config: RunConfig,
    explicit: set[str] | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    data: Any = None,
) -> RunResult:
    """Run one stage start to end: plan, data, model, rows, resume point, Trainer, baseline, fit, measure, metrics,
    save, publish, finish. Everything that can be checked is checked before anything is written.

    Args:
        config: the stage's settings.
        explicit: the settings the user typed (see plan_stage).
        callbacks: extra Trainer callbacks (tests use them to interrupt a run).
        data: the stage's data, already prepared (skips `prepare`).

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input or a stopped run, with a one-line message.
    """
    plan = stage.plan(config, explicit)
    data = data if data is not None else stage.prepare(plan)
    loaded = stage.load(plan)
    rows = stage.rows(plan, data, loaded.tokenizer)
    settings = stage.settings(plan, data, rows)
    resume_from = resume_point(plan, settings)
    trainer = stage.trainer(plan, loaded, rows, data, settings, callbacks)
    baseline = stage.baseline(plan, trainer, loaded, data, rows)
    fitted = fit(plan, trainer, resume_from, stage.stopped, stage.nan_advice)
    try:
        after = stage.measure(plan, fitted.trainer, loaded, data, rows, baseline)
        metrics = stage.metrics(plan, fitted, loaded, data, rows, baseline, after)
    finally:
        fitted.stop_monitor()
    if plan.is_main:
        for line in gain_lines(metrics):
            logger.info(line)
        if unchanged := unchanged_line(metrics):
            logger.warning(unchanged)
    save_stage(plan, fitted, metrics, loaded.tokenizer, stage.record(plan, data, metrics))
    published = publish_stage(plan, stage, data)
    metrics.update(published.metrics)
    finish_run(plan)
    check_weights_changed(plan, metrics)
    return RunResult(metrics, plan.output_dir, plan.logs_dir, fitted.resumed_from, data, published, plan.is_main)
