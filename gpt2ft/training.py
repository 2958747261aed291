"""Fine-tune a causal LM on conversations with transformers' Trainer: the parts of the `train` stage.

    python -m gpt2ft train                       # GPT-2 small, DailyDialog from the Hub, defaults for a Colab T4
    python -m gpt2ft train --model ./tiny --data ../shared/data/dailydialog --max-train-dialogs 300 --epochs 1

`train()` runs the stage through the shared run library (runs.run_stage); the notebook calls the same parts one
cell each, passing each result on:

    plan_run -> prepare_data -> load_model_for_training -> tokenize_data -> resume point -> fit -> evaluate_run
             -> save_run -> publish_run -> finish_run

What is particular to `train` lives here: gpt2ft's Trainer (packed batches, token-weighted evaluation), the data
preparation and tokenised cache, the validation/test evaluation, what the saved folder records, its card and
charts. Totals across resumes, checkpoints, NaN/out-of-memory stops and the atomic save are runs.py's.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import seed_worker

from .charts import CONTROL_CHART, write_charts, write_control_chart
from .chat_format import describe_template, template_of
from .checkpoints import TrainingError
from .config import TrainConfig
from .controls import check_labelled, condition_fields, conditioned_template
from .data import DialogueCollator, PreparedDialogs, column, prepare_from_config, tokenize_prepared
from .evaluation import evaluate_control, evaluate_dialogs, evaluate_loss, sample_replies
from .judge import JUDGE_DIR, fit_judge, save_judge
from .loss import use_chunked_loss
from .modelcard import render_model_card
from .modeling import Hardware, load_model_and_tokenizer, load_model_config, load_tokenizer
from .monitor import SystemMonitor
from .runs import (
    FitResult,
    LoadedModel,
    Published,
    RunPlan,
    RunResult,
    Stage,
    WholeRunTrainer,
    base_run_settings,
    oom_message,
    plan_stage,
    publish_stage,
    resolve_max_length,
    run_callbacks,
    run_facts,
    run_stage,
    save_stage,
    trainer_settings,
)
from .runs import fit as fit_trainer
from .runs import resume_point as find_resume_point
from .scale import apply_method, describe_method, report_parameter_counts

logger = logging.getLogger(__name__)

# The one metrics.json key set the saved folder repeats in training_config.json (serve and the card read it there).
RECORDED_METRICS = (
    "train_loss",
    "eval_loss",
    "eval_perplexity",
    "test_loss",
    "test_perplexity",
    "base_eval_loss",
    "base_eval_perplexity",
)


class DialogueTrainer(WholeRunTrainer, Trainer):
    """Trainer with gpt2ft's batches, token-weighted evaluation and whole-run totals (target tokens, loss, time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flop_params: int | None = None
        # In a notebook the Trainer shows its progress table; the test split's table then says "Test Loss", not
        # transformers' "Validation Loss" for every split (gpt2ft.progress). Loaded only there: it imports IPython.
        notebook = sys.modules.get("transformers.utils.notebook")
        if notebook is not None and self.pop_callback(notebook.NotebookProgressCallback) is not None:
            from .progress import SplitProgressCallback

            self.add_callback(SplitProgressCallback)

    def get_train_dataloader(self):
        """gpt2ft's batches (DialogueCollator.loader: packed rows, a few fixed shapes, reshuffled each epoch by the
        run's seed), with the Trainer's worker settings, prepared by accelerate (device placement, sharding over
        processes, skipping the batches a resumed run has already trained on)."""
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
            f"{metric_key_prefix}_bits_per_byte": result["bits_per_byte"],
            f"{metric_key_prefix}_runtime": round(runtime, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_training_args(
    config: TrainConfig, precision: str, hardware: Hardware, output_dir: str | Path, max_length: int = 0
) -> TrainingArguments:
    """TrainingArguments for a run (runs.trainer_settings), with gpt2ft's own batching and optional torch.compile.

    Raises:
        ValueError: the Trainer rejects a setting (an unknown --optim).
    """
    return TrainingArguments(
        **trainer_settings(config, precision, hardware, output_dir),
        remove_unused_columns=False,  # DialogueCollator picks the columns and batches by `length`
        torch_compile=config.compile,
    )


# --------------------------------------------------------------------------------------------------------------
# The parts of the stage, in the order they run
# --------------------------------------------------------------------------------------------------------------


def plan_run(config: TrainConfig, explicit: set[str] | None = None) -> RunPlan:
    """Settle the run's settings and check everything that can be checked cheaply, before the data loads
    (runs.plan_stage).

    Args:
        config: the settings as given.
        explicit: the settings the user typed (the CLI knows); the T4 presets change only the others. None: the
            settings that differ from the defaults.

    Raises:
        TrainingError, ModelError, ConfigError: with a message naming the setting.
    """
    return plan_stage(config, explicit, build_training_args)


def prepare_data(plan: RunPlan) -> PreparedDialogs:
    """Load, clean, de-duplicate and (for debugging) truncate the dialogues; report skipped lines."""
    with plan.args.main_process_first(desc="preparing the data"):  # under torchrun the others reuse its caches
        prepared = prepare_from_config(plan.config)
    check_labelled(prepared.dialogs["train"], condition_fields(plan.config.condition), prepared.source)
    if plan.is_main and prepared.skipped:
        logger.info("skipped while reading the data:")
        for line in prepared.skipped:
            logger.info(f"  {line}")
    return prepared


def load_model_for_training(plan: RunPlan) -> LoadedModel:
    """The base model and tokenizer, with LoRA adapters when `--method lora`. The tokenizer keeps the model's own
    chat template, or gets gpt2ft's when it has none (modeling.load_tokenizer): the format it trains in, which the
    saved model then carries."""
    model, tokenizer = load_model_and_tokenizer(plan.config.model)
    fields = condition_fields(plan.config.condition)
    if fields:  # the template takes the labels: training reads them, the saved model asks for them
        tokenizer.chat_template = conditioned_template(template_of(tokenizer), fields)
    model, counts = apply_method(model, plan.config, report=False)  # reported with the Trainer, once all is checked
    return LoadedModel(model, tokenizer, counts)


def tokenize_data(plan: RunPlan, prepared: PreparedDialogs, tokenizer: Any) -> Any:
    """Training rows of every split (cached under the cache folder; built once, by the main process)."""
    with plan.args.main_process_first(desc="tokenising"):
        return tokenize_prepared(prepared, tokenizer, plan.max_length, plan.config.cache_dir, write=plan.is_main)


def run_settings(plan: RunPlan, prepared: PreparedDialogs, rows: Any = None) -> dict[str, Any]:
    """What makes a run this run: runs.base_run_settings, plus how many dialogues each split holds and the loss mode
    as resolved. A checkpoint resumes only under the same values."""
    return {
        **base_run_settings(plan),
        "data_dialogs": {split: len(prepared.dialogs[split]) for split in prepared.dialogs},
        "loss_on_resolved": prepared.loss_on,
    }


def resume_point(plan: RunPlan, prepared: PreparedDialogs) -> str | None:
    """The checkpoint this run continues from (`--resume`), checked to belong to the same run; None to start fresh.

    Raises:
        TrainingError: the checkpoint was made with other settings (the message lists them and the ways out).
    """
    return find_resume_point(plan, run_settings(plan, prepared))


def build_trainer(
    plan: RunPlan,
    loaded: LoadedModel,
    rows: Any,
    prepared: PreparedDialogs | None = None,
    settings: dict[str, Any] | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> DialogueTrainer:
    """The run's Trainer: gpt2ft's batches, the chunked loss (loss.use_chunked_loss), token-weighted evaluation,
    whole-run totals, checkpoint markers and the JSONL log. The model's KV cache is switched off: packed rows stay
    apart only without it (see modeling.without_kv_cache), for every forward the Trainer or the library makes;
    save_run turns it back on."""
    loaded.model.config.use_cache = False
    use_chunked_loss(loaded.model)
    if plan.is_main and loaded.parameter_counts:
        report_parameter_counts(loaded.parameter_counts, describe_method(plan.config))
    return DialogueTrainer(
        model=loaded.model,
        args=plan.args,
        data_collator=DialogueCollator(loaded.tokenizer, plan.config.batching),
        train_dataset=rows["train"],
        eval_dataset=rows["validation"],
        processing_class=loaded.tokenizer,
        precision=plan.precision,
        callbacks=run_callbacks(plan, settings or {}, callbacks),
    )


def fit(
    plan: RunPlan,
    loaded: LoadedModel,
    rows: Any,
    prepared: PreparedDialogs,
    resume_from: str | None,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> FitResult:
    """Train, continuing from `resume_from` (see resume_point) when given (the notebook's cell; run_stage builds the
    Trainer and calls runs.fit itself).

    Raises:
        TrainingError: out of GPU memory, or a NaN/infinite loss.
    """
    trainer = build_trainer(plan, loaded, rows, prepared, run_settings(plan, prepared), callbacks)
    return fit_trainer(plan, trainer, resume_from)


HELD_OUT = ("eval", "test")  # metric prefixes of the validation and test splits
SCORES = ("loss", "perplexity", "tokens", "bits_per_byte")


def score_starting_model(plan: RunPlan, model: Any, tokenizer: Any, rows: Any) -> dict[str, Any]:
    """A model (the starting one, before any step) on the held-out rows, scored exactly as training evaluates them
    (same rows, collator, batch size and precision, on the training device): loss, perplexity, target tokens and
    bits per byte of validation and test, as base_eval_* and base_test_*.

    Raises:
        TrainingError: out of GPU memory while evaluating.
    """
    scores: dict[str, Any] = {}
    collator = DialogueCollator(tokenizer, plan.config.batching)
    model.to(plan.args.device)
    try:
        for prefix, split in zip(HELD_OUT, ("validation", "test")):
            result = evaluate_loss(
                model,
                rows[split],
                collator,
                batch_size=plan.config.eval_batch_size,
                device=plan.args.device,
                precision=plan.precision,
                rank=plan.args.process_index,
                world_size=plan.args.world_size,
            )
            scores.update({f"base_{prefix}_{key}": result[key] for key in SCORES})
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(oom_message(plan, evaluating=True)) from None
    return scores


def score_base_model(
    plan: RunPlan, trainer: DialogueTrainer, loaded: LoadedModel, prepared: PreparedDialogs, rows: Any
) -> dict[str, Any]:
    """The stage's baseline: the starting model on the held-out rows the trained one is scored on
    (score_starting_model). Scored before the Trainer starts, so a resumed run (whose trained weights load inside
    trainer.train) scores the starting model too."""
    return score_starting_model(plan, loaded.model, loaded.tokenizer, rows)


def measure(
    plan: RunPlan, trainer: DialogueTrainer, loaded: LoadedModel, prepared: PreparedDialogs, rows: Any, baseline: Any
) -> dict[str, Any]:
    """Token-weighted loss, perplexity and bits per byte of the trained (best) model on validation and test. The
    validation figures of the best checkpoint were computed when it was chosen (the Trainer loaded it back): they
    are read from the log, not computed again.

    Raises:
        TrainingError: out of GPU memory while evaluating.
    """
    best = best_evaluation(trainer.state)
    try:
        validation = best or trainer.evaluate(rows["validation"], metric_key_prefix="eval")
        return {**validation, **trainer.evaluate(rows["test"], metric_key_prefix="test")}
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(oom_message(plan, evaluating=True)) from None


def best_evaluation(state: Any) -> dict[str, Any] | None:
    """The validation scores logged at the best checkpoint's step (the model load_best_model_at_end put back), or
    None when the log has none there."""
    step = getattr(state, "best_global_step", None)
    if not step:
        return None
    for record in reversed(state.log_history):
        if record.get("step") == step and "eval_loss" in record:
            return {f"eval_{key}": record.get(f"eval_{key}") for key in SCORES}
    return None


def train_metrics(
    plan: RunPlan,
    fitted: FitResult,
    loaded: LoadedModel,
    prepared: PreparedDialogs,
    rows: Any,
    baseline: Any,
    after: dict[str, Any],
) -> dict[str, Any]:
    """The metrics as metrics.json holds them: the run's facts and whole-run totals (runs.run_facts), the held-out
    loss and perplexity, and what the data held."""
    return {
        **run_facts(plan, fitted, loaded),
        **{f"{prefix}_{key}": after.get(f"{prefix}_{key}") for prefix in HELD_OUT for key in SCORES},
        **(baseline or {}),
        "chat_template": describe_template(template_of(loaded.tokenizer)),
        "train_dialogs": len(prepared.dialogs["train"]),
        "eval_dialogs": len(prepared.dialogs["validation"]),
        "test_dialogs": len(prepared.dialogs["test"]),
        "train_rows": len(rows["train"]),
        "data_counts": prepared.counts,
        "skipped_lines": prepared.skipped,
        "model": plan.config.model,
    }


def evaluate_run(
    plan: RunPlan,
    fitted: FitResult,
    loaded: LoadedModel,
    prepared: PreparedDialogs,
    rows: Any,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Token-weighted loss and perplexity of the trained (best) model on validation and test, with the run's
    whole-run totals and the starting model's scores (`baseline`, score_starting_model's): the metrics as
    metrics.json holds them (the notebook's cell)."""
    after = measure(plan, fitted.trainer, loaded, prepared, rows, baseline)
    try:
        return train_metrics(plan, fitted, loaded, prepared, rows, baseline, after)
    finally:
        fitted.stop_monitor()


def training_record(plan: RunPlan, prepared: PreparedDialogs, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the saved folder's training_config.json records: the settings, the window and precision, the data and
    how it was read, and the headline metrics (eval, compare, serve and a later prefer read them)."""
    return {
        "config": plan.config.to_dict(),
        "max_length": plan.max_length,
        "precision": plan.precision,
        "data_source": prepared.source,
        "data_counts": prepared.counts,
        "data_is_dailydialog": prepared.is_dailydialog,
        "has_roles": prepared.has_roles,
        "loss_on": prepared.loss_on,
        "metrics": {key: metrics[key] for key in RECORDED_METRICS},
    }


def save_run(
    plan: RunPlan, fitted: FitResult, metrics: dict[str, Any], tokenizer: Any, prepared: PreparedDialogs
) -> Path:
    """Write the model folder atomically (merged, for LoRA), metrics.json and the final train_log.jsonl; free the
    Trainer's optimizer (runs.save_stage)."""
    return save_stage(plan, fitted, metrics, tokenizer, training_record(plan, prepared, metrics))


def measure_controls(plan: RunPlan, published: Published, prepared: PreparedDialogs) -> dict[str, Any] | None:
    """For a conditioned run (`--condition`): the judge of its labels, fitted on the run's training turns and saved
    with the model (judge/), its own scores on the test turns, the control accuracy of the saved model on
    --control-contexts test contexts (evaluation.evaluate_control), and the held-out perplexity with no labels
    asked for (the quality of an unconditioned reply). None for a plain run."""
    fields = condition_fields(plan.config.condition)
    if not fields:
        return None
    judge = fit_judge(prepared.dialogs["train"], fields, test=prepared.dialogs["test"])
    save_judge(judge, plan.output_dir / JUDGE_DIR)
    model, tokenizer = published.model, published.tokenizer
    control = evaluate_control(
        model, tokenizer, judge, prepared.dialogs["test"], plan.config.control_contexts, seed=plan.config.seed
    )
    unlabelled = {}
    for prefix, split in zip(HELD_OUT, ("validation", "test")):
        scored = evaluate_dialogs(
            model,
            tokenizer,
            prepared.dialogs[split],
            plan.max_length,
            prepared.loss_on,
            plan.config.eval_batch_size,
            plan.config.batching,
            labels="none",
        )
        unlabelled.update({f"{prefix}_{key}_unlabelled": scored[key] for key in ("loss", "perplexity")})
    return {"control": {**control, "judge": judge.scores}, **unlabelled}


def draw_charts(plan: RunPlan) -> list[Path]:
    """The five training charts (loss, GPU, memory, CPU/disk), and the control chart of a conditioned run, from the
    logs on disk."""
    control = write_control_chart(plan.logs_dir, plan.config.images_dir)
    return write_charts(plan.logs_dir, plan.config.images_dir) + ([control] if control else [])


def sample_held_out(model: Any, tokenizer: Any, prepared: PreparedDialogs, count: int = 3) -> list[dict[str, Any]]:
    """Greedy replies of the saved model to the first held-out validation dialogues, for the card."""
    return sample_replies(model, tokenizer, prepared.dialogs["validation"], count, greedy=True, max_new_tokens=40)


TRAIN = Stage(
    name="train",
    plan=plan_run,
    prepare=prepare_data,
    load=load_model_for_training,
    rows=tokenize_data,
    settings=run_settings,
    trainer=build_trainer,
    baseline=score_base_model,
    measure=measure,
    metrics=train_metrics,
    record=training_record,
    card=render_model_card,
    charts=draw_charts,
    samples=sample_held_out,
    evaluate_saved=measure_controls,
    card_charts=("chart_train.png", CONTROL_CHART),
)


def publish_run(plan: RunPlan, prepared: PreparedDialogs) -> Published:
    """Charts, sample replies and the model card, made from what is on disk after the model is safely saved
    (runs.publish_stage): each step that fails is reported on stderr and skipped."""
    return publish_stage(plan, TRAIN, prepared)


def train(
    config: TrainConfig,
    prepared: PreparedDialogs | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    explicit: set[str] | None = None,
) -> RunResult:
    """Fine-tune, evaluate, save and publish: the whole run (runs.run_stage over TRAIN).

    Args:
        config: the run's settings.
        prepared: dialogues already loaded.
        callbacks: extra Trainer callbacks (tests use them to interrupt a run).
        explicit: the settings the user typed (see plan_run).

    Returns:
        RunResult with the final metrics (also written to `logs/metrics.json`).

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input or a stopped run, with a clear message.
    """
    return run_stage(TRAIN, config, explicit, callbacks, data=prepared)


def prepare_cache(config: TrainConfig) -> dict[str, Any]:
    """`python -m gpt2ft prepare`: load, clean, split, de-duplicate and tokenise the data into the cache that `train`
    with the same settings reuses, and measure it.

    Returns:
        {"source", "loss_on", per split {"dialogs", "tokens"}, "removed" and "skipped" per split, "seconds",
        "peak_rss_mb"}: what the JSON line holds.
    """
    started = time.perf_counter()
    with SystemMonitor(None, 0.25, only=("memory",), tree_memory=True) as memory:
        max_length = resolve_max_length(config, load_model_config(config.model))
        prepared = prepare_from_config(config)
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
