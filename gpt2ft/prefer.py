"""Preference tuning (DPO, KTO) with TRL on gpt2ft's run machinery: the next model learns from the blind A/B page's
votes, or from a preference dataset.

    python -m gpt2ft prefer                                   # gpt2_finetuned + logs/votes.sqlite -> gpt2_preferred
    python -m gpt2ft prefer --data prefs.jsonl --algorithm kto --method lora
    python -m gpt2ft serve --model gpt2_preferred             # compares with the model it started from: vote again

TRL's DPOTrainer and KTOTrainer compute the losses; gpt2ft's run library (runs.py) keeps around them what `train`
has: the run folders and atomic save, resuming the same run only, whole-run numbers, NaN and out-of-memory stops,
T4 presets, LoRA (the reference is then the model with its adapters off). What is particular to this stage lives
here: the data (votes and TRL's layouts, the model's own chat template, held-out conversations chosen by hash;
preferences.py), TRL's trainers, the before/after measurements, the saved record, the card and the chart. `prefer()`
runs the stage's parts (PREFER) through runs.run_stage:

    plan_preference -> prepare_preferences (+ supervised_dialogs) -> load_policy -> preference_rows -> resume point
        -> build_preference_trainer (+ report_data) -> baseline -> fit -> measure -> preference_metrics
        -> save -> publish -> finish

Measured per run, on the held-out pairs before and after (every pair counted once, not a mean of batch means):
reward accuracy and margin (the implicit reward beta * log(pi / pi_ref) of the chosen reply above the rejected
one's; before training the model is its own reference, so both are 0 by definition), how often the model itself
finds the chosen reply more likely, and the model's perplexity on its supervised validation dialogues, so a
preference stage that wrecks the language model shows it.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .charts import PREFER_CHART, write_charts, write_preference_chart
from .chat_format import apply_template, end_of_turn, render_ids, stop_token_ids
from .checkpoints import TrainingError
from .config import PreferConfig, read_training_config, saved_run_config
from .data import IGNORE_INDEX, prepare_from_config
from .evaluation import evaluate_dialogs
from .generate import generate_reply, keep_latest_turns
from .loss import core_model, last_hidden_states
from .modelcard import render_preference_card
from .modeling import ModelError, autocast_context, load_model_and_tokenizer
from .preferences import SKIP_TOO_LONG, SKIP_TURN_TOO_LONG, PreferenceData, Skips, read_preferences
from .runs import (
    FitResult,
    LoadedModel,
    RunPlan,
    RunResult,
    Stage,
    WholeRunTrainer,
    base_run_settings,
    oom_message,
    plan_stage,
    run_callbacks,
    run_facts,
    run_stage,
    trainer_settings,
)
from .scale import build_lora_config, describe_method, parameter_counts, report_parameter_counts
from .sources import DataError, quiet_datasets

# TRL is imported inside the functions that build its trainers and configs: importing it takes ~2 s more than
# torch and transformers, which the plan's checks (a bad flag or votes file fails before anything loads) and the
# tests of the stage's parts need not pay.

logger = logging.getLogger(__name__)

SAMPLE_COUNT = 3


# --------------------------------------------------------------------------------------------------------------
# TRL's trainers, with gpt2ft's whole-run totals
# --------------------------------------------------------------------------------------------------------------


class PreferenceTrainerMixin(WholeRunTrainer):
    """What gpt2ft adds to TRL's DPOTrainer and KTOTrainer: train's whole-run totals, logged fields, bad-step and
    checkpoint rules (runs.WholeRunTrainer), no telemetry and no TRL model card in the checkpoints (gpt2ft
    writes its own card)."""

    def _send_telemetry(self) -> None:
        # TRL pings the Hub when a trainer is built; gpt2ft never phones home (offline runs, shared machines).
        return None

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # TRL writes a card into every checkpoint; the saved model gets gpt2ft's card, made from what is on disk.
        return None

    def target_labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        # The replies' tokens (chosen and rejected, EOS included) are what the preference loss is computed on.
        return inputs["completion_mask"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.run_totals.exclude(time.perf_counter() - started)  # training time excludes evaluations


def trainer_classes() -> dict[str, type]:
    """The Trainer of each algorithm: TRL's, with PreferenceTrainerMixin.

    The two classes are built here, not at module level, because their bases are TRL's: TRL is imported only when a
    run needs it.
    """
    from trl import DPOTrainer, KTOTrainer

    class PreferenceDPOTrainer(PreferenceTrainerMixin, DPOTrainer):
        pass

    class PreferenceKTOTrainer(PreferenceTrainerMixin, KTOTrainer):
        pass

    return {"dpo": PreferenceDPOTrainer, "kto": PreferenceKTOTrainer}


def build_preference_args(
    config: PreferConfig, precision: str, hardware: Any, output_dir: str | Path, max_length: int
) -> Any:
    """TRL's DPOConfig or KTOConfig for a run: the same schedule, precision, checkpointing and evaluation rules as
    `train` (runs.trainer_settings), with the preference settings on top.

    TRL's configs differ from the Trainer's defaults in ways that matter here, so each is set: bf16 would be on
    whenever fp16 is off (a T4 has no bf16 units: gpt2ft's precision rule decides), gradient checkpointing would be
    on (it costs ~20% speed; --gradient-checkpointing decides), and the learning rate is gpt2ft's.

    Raises:
        ValueError: TRL or the Trainer rejects a setting (an unknown --optim).
    """
    from trl import DPOConfig, KTOConfig

    common = dict(
        **trainer_settings(config, precision, hardware, output_dir),
        # Prompts are fitted to the window beforehand (trim_records), so TRL cuts no reply; the limit still bounds the
        # mismatched prompt + reply sequences KTO builds for its KL estimate.
        max_length=max_length,
        beta=config.beta,
    )
    if config.algorithm == "dpo":
        return DPOConfig(**common)
    # KTO's KL estimate pairs each example with its neighbour in a fixed-order batch: TRL needs sequential sampling
    # (prepare_preferences shuffles the examples once, with the seed, instead).
    return KTOConfig(
        **common,
        train_sampling_strategy="sequential",
        desirable_weight=config.desirable_weight or 1.0,
        undesirable_weight=config.undesirable_weight or 1.0,
    )


def kto_weights(config: PreferConfig, labels: Sequence[bool]) -> tuple[float, float]:
    """KTO's (desirable, undesirable) loss weights: as set, or (unset) chosen from the counts so that both sides
    weigh alike, desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = 1, inside the KTO paper's
    recommended [1, 4/3] (eq. 8). Votes give more undesirable replies than desirable ones (a both-bad vote gives
    two)."""
    desirable = sum(1 for label in labels if label)
    undesirable = len(labels) - desirable
    if config.desirable_weight is not None or config.undesirable_weight is not None or not desirable or not undesirable:
        return config.desirable_weight or 1.0, config.undesirable_weight or 1.0
    if desirable >= undesirable:
        return 1.0, desirable / undesirable
    return undesirable / desirable, 1.0


# --------------------------------------------------------------------------------------------------------------
# Stage 1: plan (every cheap check, before anything is loaded or written)
# --------------------------------------------------------------------------------------------------------------


def started_from(model: str) -> str:
    """The starting model as recorded in the preferred model: a local folder by its absolute path (so `serve` finds
    it from anywhere), a Hub id as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def plan_preference(config: PreferConfig, explicit: set[str] | None = None) -> RunPlan:
    """Settle a preference run's settings and check what can be checked cheaply (runs.plan_stage), and that the
    preferred model does not overwrite the model it starts from.

    Args:
        explicit: the settings the user typed; the T4 presets change only the others (never the learning rate,
            which is the preference stage's own). None: the settings that differ from the defaults.

    Raises:
        TrainingError, ModelError, ConfigError: with a message naming the setting.
    """
    if Path(config.model).expanduser().resolve() == Path(config.output_dir).expanduser().resolve():
        raise TrainingError(
            f"--output-dir {config.output_dir}: is the model being tuned (--model); write the preferred model to "
            "another folder, so the starting model stays for the reference, for resuming and for the next round of "
            "votes"
        )
    return plan_stage(config, explicit, build_preference_args, keep=("learning_rate",))


# --------------------------------------------------------------------------------------------------------------
# The preferences, the model, prompts that fit the window
# --------------------------------------------------------------------------------------------------------------


def prepare_preferences(plan: RunPlan) -> PreferenceData:
    """Read the preferences and hold out validation conversations (report_data prints what was used and skipped),
    and the supervised dialogues whose perplexity is measured before and after (`supervised_dialogs`).

    Raises:
        DataError: bad input (see preferences.read_preferences), or --sft-data cannot be read.
    """
    config = plan.config
    data = read_preferences(
        config.data,
        config.algorithm,
        config.cache_dir,
        config.validation_fraction,
        config.max_train_pairs,
        config.max_eval_pairs,
    )
    if config.algorithm == "kto":
        # TRL's KTO reads the examples in order (see build_preference_args): shuffle them once, reproducibly, so a
        # batch does not hold one conversation's two replies and nothing else.
        random.Random(config.seed).shuffle(data.records["train"])
    data.supervised = supervised_dialogs(plan)
    return data


def report_data(plan: RunPlan, data: PreferenceData) -> None:
    """Print what the run learns from: the votes or records read, the training and held-out pairs, and each reason
    something was skipped. Called once every check has passed, so bad input stays one line."""
    if not plan.is_main:
        return
    counts = data.counts
    winners = counts.get("winners")
    read = (
        f"{winners['votes']:,} votes ({winners['a']:,} A better, {winners['b']:,} B better, {winners['tie']:,} ties, "
        f"{winners['both_bad']:,} both bad)"
        if winners
        else f"{counts['read']:,} records ({data.layout} layout)"
    )
    logger.info(
        f"preferences from {data.source}: {read} -> {len(data.records['train']):,} training and "
        f"{len(data.records['validation']):,} held-out {data.unit} ({counts['held_out']})"
    )
    for line in data.skipped:
        logger.info(f"  {line}")
    if few := few_pairs_line(len(data.records["train"]), data.unit):
        logger.warning(few)
    if data.supervised is not None:
        logger.info(data.supervised.described)


# Below this many training pairs a preference run is a trial: a few steps, a held-out score of a handful of pairs.
FEW_PAIRS = 50


def few_pairs_line(count: int, unit: str = "pairs") -> str | None:
    """What to expect from a run on few pairs (None from FEW_PAIRS up)."""
    if count >= FEW_PAIRS:
        return None
    return (
        f"only {count} training {unit}: expect a small change, measured on very few held-out {unit} (each moves the "
        f"reward accuracy a lot); a few hundred votes make a clearer difference"
    )


def load_policy(plan: RunPlan) -> LoadedModel:
    """The model to tune and its tokenizer, with the chat template it was trained with (gpt2ft's for a model that
    has none): the preference data is rendered in the format the model knows."""
    model, tokenizer = load_model_and_tokenizer(plan.config.model)
    return LoadedModel(model, tokenizer, parameter_counts(model))


def trim_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    skips: Skips,
    split: str,
    model_name: str = "--model",
) -> list[dict[str, Any]]:
    """The records whose prompt and longest reply fit in `max_length` tokens; a prompt too long keeps its latest whole
    turns (generate.keep_latest_turns, as the chat does). Records that cannot fit are skipped and counted.

    Lengths come from the model's chat template itself, rendered as TRL renders them (the prompt with the generation
    prompt, prompt + reply without), so they are the tokens it will train on.

    Raises:
        ModelError: the template does not end a reply with its end-of-turn token (the tuned model would learn not to
            stop); checked
            here, before anything is written.
    """

    stops = stop_token_ids(tokenizer)

    def reply_tokens(prompt: list[dict[str, str]], prompt_tokens: int, reply: list[dict[str, str]]) -> int:
        ids = apply_template(tokenizer, prompt + reply, tokenize=True, return_dict=False)
        # The template's end-of-turn token closes the reply; ChatML writes a newline after it, which TRL keeps.
        last = len(ids)
        while last and ids[last - 1] not in stops and not tokenizer.decode(ids[last - 1 : last]).strip():
            last -= 1
        if not last or ids[last - 1] not in stops:
            raise ModelError(
                f"--model {model_name}: its chat template does not end a reply with "
                f"{end_of_turn(tokenizer)!r}; preference tuning would teach the model not to stop"
            )
        return len(ids) - prompt_tokens

    replies = [name for name in ("chosen", "rejected", "completion") if records and name in records[0]]
    fitted = []
    for index, record in enumerate(records):
        prompt = record["prompt"]
        prompt_tokens = len(render_ids(tokenizer, prompt))
        longest = max(reply_tokens(prompt, prompt_tokens, record[name]) for name in replies)
        if prompt_tokens + longest > max_length:
            budget = max_length - longest
            kept = keep_latest_turns(tokenizer, prompt, budget) if budget >= 2 else None
            if kept is None:
                skips.add(SKIP_TOO_LONG if budget < 2 else SKIP_TURN_TOO_LONG, f"{split} record {index}")
                continue
            record = {**record, "prompt": kept}
        fitted.append(record)
    return fitted


def preference_rows(plan: RunPlan, data: PreferenceData, tokenizer: Any) -> Any:
    """Every split's records as a datasets.Dataset, each prompt fitted to the training window (trim_records); what was
    skipped is added to the data's counts (report_data prints them).

    Raises:
        DataError: no training or held-out record fits the context.
        ModelError: the model's chat template does not end a reply with EOS.
    """
    skips = Skips()
    fitted = {
        split: trim_records(records, tokenizer, plan.max_length, skips, split, plan.config.model)
        for split, records in data.records.items()
    }
    for reason, count in skips.counts.items():
        data.counts["skipped"][reason] = data.counts["skipped"].get(reason, 0) + count
    data.skipped += skips.lines()
    for split, records in fitted.items():
        data.counts[split]["used"] = len(records)
        if not records:
            raise DataError(f"{data.source}: no {split} {data.unit} fit the {plan.max_length}-token context")
    return DatasetDict({split: Dataset.from_list(records) for split, records in fitted.items()})


def run_settings(plan: RunPlan, data: PreferenceData, rows: Any) -> dict[str, Any]:
    """What makes a preference run this run: runs.base_run_settings, plus the data (its content's fingerprint and the
    records of each split that fit). A checkpoint resumes only under the same values."""
    return {
        **base_run_settings(plan),
        "data_records": {split: len(rows[split]) for split in rows},
        "data_identity": data.identity,
    }


@dataclass
class SupervisedDialogs:
    """The held-out dialogues the model was fine-tuned to predict (validation and test), prepared as `train`
    prepared them."""

    splits: dict[str, Any]
    loss_on: str
    max_length: int | None
    source: str
    described: str = ""  # what is scored, for the data report (printed once every check has passed)


def supervised_dialogs(plan: RunPlan) -> SupervisedDialogs | None:
    """The validation and test dialogues of the data recorded in --model's folder (or --sft-data), at most
    --max-sft-dialogs of each, to measure the language model before and after; None when there are none (a model
    gpt2ft did not train, or --sft-data none).

    Raises:
        DataError: --sft-data was given and cannot be read. Recorded data that cannot be read any more (moved, or the
            Hub out of reach) is reported and skipped: it is a measurement, not the run.
    """
    config = plan.config
    if config.sft_data == "none":
        return None
    recorded, max_length = saved_run_config(config.model)
    if config.sft_data is None and "config" not in read_training_config(config.model):
        if plan.is_main:
            logger.info(
                f"no supervised data recorded in {config.model}: perplexity before/after not measured "
                "(pass --sft-data SRC)"
            )
        return None
    settings = recorded.replace(
        data=config.sft_data or recorded.data,
        cache_dir=config.cache_dir,
        max_train_dialogs=None,
        max_eval_dialogs=config.max_sft_dialogs,
    )
    try:
        prepared = prepare_from_config(settings)
    except DataError as error:
        if config.sft_data is not None:
            raise DataError(f"--sft-data {config.sft_data}: {error}") from None
        if plan.is_main:
            logger.info(f"perplexity before/after not measured: the recorded supervised data cannot be read ({error})")
        return None
    counts = prepared.counts
    described = (
        f"perplexity before and after on {counts['validation']['used']:,} validation and "
        f"{counts['test']['used']:,} test dialogues of {prepared.source}"
        + (
            f" (of {counts['validation']['kept']:,} and {counts['test']['kept']:,}: --max-sft-dialogs)"
            if prepared.limits
            else ""
        )
    )
    return SupervisedDialogs(
        {split: prepared.dialogs[split] for split in ("validation", "test")},
        prepared.loss_on,
        max_length or plan.max_length,
        prepared.source,
        described,
    )


# --------------------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------------------


def build_preference_trainer(
    plan: RunPlan,
    loaded: LoadedModel,
    rows: Any,
    data: PreferenceData,
    settings: dict[str, Any],
    callbacks: Sequence[TrainerCallback] | None = None,
) -> Any:
    """TRL's DPOTrainer or KTOTrainer (with PreferenceTrainerMixin) over the fitted records: TRL renders them with the
    model's chat template and tokenises them. With --method lora TRL wraps the model in the adapters itself, so the
    reference is the model with its adapters off (no second copy); with full tuning TRL keeps a frozen copy. Once
    it is built every check has passed, so the data report is printed here (report_data).
    """
    config = plan.config
    if config.algorithm == "kto":
        plan.args.desirable_weight, plan.args.undesirable_weight = kto_weights(config, rows["train"]["label"][:])
    peft_config = build_lora_config(config, loaded.model) if config.method == "lora" else None
    loaded.model.config.use_cache = False  # training forwards never use it; runs.save_stage turns it back on
    trainer_class = trainer_classes()[config.algorithm]
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # TRL loads the reference copy with a per-tensor bar: noise for GPT-2
    try:
        with warnings.catch_warnings(), quiet_datasets():  # TRL's tokenising maps are quick: no progress bars
            warnings.simplefilter("ignore", FutureWarning)  # PEFT and TRL still ask for is_gradient_checkpointing
            trainer = trainer_class(
                model=loaded.model,
                args=plan.args,
                train_dataset=rows["train"],
                eval_dataset=rows["validation"],
                processing_class=loaded.tokenizer,
                peft_config=peft_config,
                precision=plan.precision,
                callbacks=run_callbacks(plan, settings, callbacks),
            )
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    loaded.parameter_counts = parameter_counts(trainer.model)
    if plan.is_main:
        report_parameter_counts(loaded.parameter_counts, describe_method(config))
    report_data(plan, data)
    return trainer


def reply_columns(rows: Any) -> tuple[str, ...]:
    """The tokenised reply columns of TRL's rows: chosen_ids and rejected_ids (DPO), or completion_ids (KTO)."""
    return tuple(name for name in ("chosen_ids", "rejected_ids", "completion_ids") if name in rows.column_names)


# --------------------------------------------------------------------------------------------------------------
# Measuring: held-out preferences and the language model, before and after
# --------------------------------------------------------------------------------------------------------------


# Reply positions scored at a time (GPT-2's 50,257-wide logits: 1,024 positions take 200 MB in fp32).
SCORE_CHUNK_POSITIONS = 1024


@torch.no_grad()
def completion_logps(
    model: Any,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    batch_size: int,
    precision: str = "fp32",
) -> list[float]:
    """log p(reply | prompt) of each sequence under `model`: the sum of the reply tokens' log-probabilities, its
    closing EOS included (what DPO's and KTO's implicit reward is built from).

    evaluation.batch_nll sums over a whole batch; here each sequence keeps its own sum. A PEFT model is scored with
    its adapters as they are (disable them around the call to score the reference).
    """
    device = next(model.parameters()).device
    core = core_model(model)
    head = core.get_output_embeddings()
    was_training = model.training
    model.eval()
    sums: list[float] = []
    try:
        with autocast_context(precision, device):
            for start in range(0, len(prompts), batch_size):
                batch = [
                    list(p) + list(r)
                    for p, r in zip(prompts[start : start + batch_size], replies[start : start + batch_size])
                ]
                width = max(len(ids) for ids in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                attention = torch.zeros_like(input_ids)
                labels = torch.full_like(input_ids, IGNORE_INDEX)
                for row, (ids, prompt) in enumerate(zip(batch, prompts[start : start + batch_size])):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                    labels[row, len(prompt) : len(ids)] = torch.tensor(ids[len(prompt) :])
                input_ids, attention, labels = input_ids.to(device), attention.to(device), labels.to(device)
                hidden = last_hidden_states(core, input_ids=input_ids, attention_mask=attention)[:, :-1]
                targets = labels[:, 1:]
                scored = targets != IGNORE_INDEX
                rows = scored.nonzero(as_tuple=True)[0]
                hidden, targets = hidden[scored], targets[scored]
                total = torch.zeros(len(batch), dtype=torch.float64, device=device)
                for chunk in range(0, targets.numel(), SCORE_CHUNK_POSITIONS):
                    piece = slice(chunk, chunk + SCORE_CHUNK_POSITIONS)
                    token_logps = -F.cross_entropy(head(hidden[piece]).float(), targets[piece], reduction="none")
                    total.index_add_(0, rows[piece], token_logps.double())
                sums += total.tolist()
    finally:
        if was_training:
            model.train()
    return sums


def reference_logps(
    trainer: Any, prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], batch_size: int, precision: str
) -> list[float]:
    """Reply log-probabilities under the reference: TRL's frozen copy, or (LoRA) the model with its adapters off."""
    if trainer.ref_model is not None:
        return completion_logps(trainer.ref_model, prompts, replies, batch_size, precision)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with model.disable_adapter():
        return completion_logps(model, prompts, replies, batch_size, precision)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def preference_scores(
    algorithm: str,
    beta: float,
    policy: dict[str, list[float]],
    reference: dict[str, list[float]],
    labels: Sequence[bool] = (),
) -> dict[str, Any]:
    """Held-out preference numbers from reply log-probabilities under the model and the reference.

    DPO (pairs): reward accuracy = share of pairs whose chosen reply's implicit reward beta*(log pi - log pi_ref)
    is above the rejected one's (strictly: a tie is no win, so it is 0 when the model is its own reference), reward
    margin = their mean difference, logp accuracy = share of pairs where the model itself finds the chosen reply
    more likely (with no reference: this one means something before training too).
    KTO (examples): reward accuracy = share of examples whose reward has the label's sign (desirable > 0,
    undesirable < 0), reward margin = mean desirable reward - mean undesirable reward.
    """
    if algorithm == "dpo":
        chosen = [beta * (p - r) for p, r in zip(policy["chosen_ids"], reference["chosen_ids"])]
        rejected = [beta * (p - r) for p, r in zip(policy["rejected_ids"], reference["rejected_ids"])]
        return {
            "pairs": len(chosen),
            "reward_accuracy": mean([float(c > r) for c, r in zip(chosen, rejected)]),
            "reward_margin": mean([c - r for c, r in zip(chosen, rejected)]),
            "chosen_reward": mean(chosen),
            "rejected_reward": mean(rejected),
            "logp_accuracy": mean([float(c > r) for c, r in zip(policy["chosen_ids"], policy["rejected_ids"])]),
            "chosen_logp": mean(policy["chosen_ids"]),
            "rejected_logp": mean(policy["rejected_ids"]),
        }
    rewards = [beta * (p - r) for p, r in zip(policy["completion_ids"], reference["completion_ids"])]
    good = [reward for reward, label in zip(rewards, labels) if label]
    bad = [reward for reward, label in zip(rewards, labels) if not label]
    return {
        "examples": len(rewards),
        "reward_accuracy": mean([float(reward > 0 if label else reward < 0) for reward, label in zip(rewards, labels)]),
        "reward_margin": mean(good) - mean(bad) if good and bad else None,
        "chosen_reward": mean(good),
        "rejected_reward": mean(bad),
        "chosen_logp": mean([p for p, label in zip(policy["completion_ids"], labels) if label]),
        "rejected_logp": mean([p for p, label in zip(policy["completion_ids"], labels) if not label]),
    }


@dataclass
class Measurement:
    """One measurement of the model: held-out preference scores and supervised perplexity, with the log-probabilities
    behind them (the reference's are reused after training: the reference does not change)."""

    scores: dict[str, Any]
    sft: dict[str, dict[str, Any]] | None  # split -> evaluation.evaluate_dialogs' result
    policy: dict[str, list[float]] = field(default_factory=dict)
    reference: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        sft = {
            f"sft_{key}": value
            for key, value in (self.sft or {}).get("validation", {}).items()
            if key in ("loss", "perplexity", "dialogs", "tokens", "bits_per_byte")
        }
        return {**self.scores, **sft}

    def held_out(self, prefix: str = "") -> dict[str, Any]:
        """The supervised validation and test scores under train's names (eval_loss, test_perplexity, ...; with
        `prefix` "base_" for the starting model), so both stages report the gain alike."""
        names = {"validation": "eval", "test": "test"}
        return {
            f"{prefix}{names[split]}_{key}": result.get(key)
            for split, result in (self.sft or {}).items()
            for key in ("loss", "perplexity", "bits_per_byte")
        }


def measure(
    plan: RunPlan,
    trainer: Any,
    loaded: LoadedModel,
    data: PreferenceData,
    rows: Any,
    reference: Measurement | None = None,
) -> Measurement:
    """Score the model as it is now: the held-out preference numbers (preference_scores, every record counted once)
    and, when there are supervised dialogues, their loss and perplexity (evaluation.evaluate_dialogs, as `eval`
    measures). The stage measures before training and after, passing the first measurement as `reference`."""
    held_out = trainer.eval_dataset
    batch_size = plan.config.eval_batch_size
    prompts = held_out["prompt_ids"][:]
    sft = data.supervised
    policy, ref = {}, {}
    try:
        for name in reply_columns(held_out):
            replies = held_out[name][:]
            policy[name] = completion_logps(trainer.model, prompts, replies, batch_size, plan.precision)
            ref[name] = (
                reference.reference[name]
                if reference is not None
                else reference_logps(trainer, prompts, replies, batch_size, plan.precision)
            )
        labels = held_out["label"][:] if "label" in held_out.column_names else ()
        scores = preference_scores(plan.config.algorithm, plan.config.beta, policy, ref, labels)
        scored = None
        if sft is not None:
            scored = {
                split: evaluate_dialogs(
                    trainer.model,
                    loaded.tokenizer,
                    dialogs,
                    sft.max_length,
                    sft.loss_on,
                    batch_size,
                    precision=plan.precision,
                )
                for split, dialogs in sft.splits.items()
            }
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(oom_message(plan, evaluating=True)) from None
    return Measurement(scores, scored, policy, ref)


def baseline(plan: RunPlan, trainer: Any, loaded: LoadedModel, data: PreferenceData, rows: Any) -> Measurement:
    """The model before preference tuning: its own reference, so its rewards are 0 by definition."""
    return measure(plan, trainer, loaded, data, rows)


# --------------------------------------------------------------------------------------------------------------
# Metrics, the saved record, card, charts and samples
# --------------------------------------------------------------------------------------------------------------


def preference_metrics(
    plan: RunPlan,
    fitted: FitResult,
    loaded: LoadedModel,
    data: PreferenceData,
    rows: Any,
    before: Measurement,
    after: Measurement,
) -> dict[str, Any]:
    """The run's metrics as metrics.json holds them: whole-run totals from the Trainer's state, the held-out scores
    and supervised perplexity before and after, and what the data held."""
    trainer = fitted.trainer
    unit = data.unit
    sft = data.supervised
    flat = {}
    for key in ("reward_accuracy", "reward_margin", "logp_accuracy", "sft_perplexity", "sft_loss"):
        for label, measurement in (("before", before), ("after", after)):
            flat[f"{key}_{label}"] = measurement.summary().get(key)
    return {
        "stage": "prefer",
        "algorithm": plan.config.algorithm,
        "beta": plan.config.beta,
        "model": plan.config.model,
        "started_from": started_from(plan.config.model),
        "data_source": data.source,
        "data_layout": data.layout,
        **run_facts(plan, fitted, loaded),
        f"train_{unit}": len(trainer.train_dataset),
        f"eval_{unit}": len(trainer.eval_dataset),
        **flat,
        **before.held_out("base_"),
        **after.held_out(),
        "before": before.summary(),
        "after": after.summary(),
        "sft_data": sft.source if sft is not None else None,
        "sft_dialogs": len(sft.splits["validation"]) if sft is not None else 0,
        "sft_test_dialogs": len(sft.splits["test"]) if sft is not None else 0,
        "data_counts": data.counts,
        "skipped": data.skipped,
        **(
            {"kto_weights": {"desirable": plan.args.desirable_weight, "undesirable": plan.args.undesirable_weight}}
            if plan.config.algorithm == "kto"
            else {}
        ),
    }


# The metrics a preferred model's training_config.json repeats (serve shows them; a next prefer reads them).
RECORDED_METRICS = (
    "reward_accuracy_before",
    "reward_accuracy_after",
    "reward_margin_after",
    "sft_perplexity_before",
    "sft_perplexity_after",
)


def preference_record(plan: RunPlan, data: PreferenceData, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the preferred model's training_config.json records: which stage made it, from which model and data,
    and the starting model's own training settings, so `eval`, `compare` and a next `prefer` find the supervised
    data, and `serve` compares with the starting model."""
    recorded = read_training_config(plan.config.model)
    return {
        "stage": "prefer",
        "algorithm": plan.config.algorithm,
        "started_from": metrics["started_from"],
        "prefer_config": plan.config.to_dict(),
        # The starting model's own settings (its supervised data, format, loss mode): what `eval` and `compare`
        # read to score this model the way its predecessor was scored.
        **{
            key: recorded[key]
            for key in ("config", "data_source", "data_is_dailydialog", "has_roles", "loss_on")
            if key in recorded
        },
        "max_length": recorded.get("max_length", plan.max_length),
        "precision": plan.precision,
        "preference_data": data.source,
        "preference_counts": data.counts,
        "metrics": {
            "eval_perplexity": metrics["sft_perplexity_after"],  # the supervised validation data's, as serve shows it
            **{key: metrics[key] for key in RECORDED_METRICS},
        },
    }


def draw_preference_charts(plan: RunPlan) -> list[Path]:
    """The five charts of `train` and the preference chart, from the logs on disk."""
    charts = write_charts(plan.logs_dir, plan.config.images_dir)
    return charts + [write_preference_chart(plan.logs_dir, plan.config.images_dir)]


def sample_preferred_replies(
    model: Any, tokenizer: Any, data: PreferenceData, count: int = SAMPLE_COUNT
) -> list[dict[str, Any]]:
    """The preferred model's greedy reply to the first `count` held-out prompts, beside the replies the data judged."""
    samples, seen = [], set()
    for record in data.records["validation"]:
        if len(samples) >= count:
            break
        if record["key"] in seen:
            continue
        seen.add(record["key"])
        reply = generate_reply(model, tokenizer, record["prompt"], greedy=True, max_new_tokens=40)
        sample = {"prompt": record["prompt"], "reply": reply.text}
        if "chosen" in record:
            sample.update(chosen=record["chosen"][-1]["content"], rejected=record["rejected"][-1]["content"])
        else:
            sample.update(completion=record["completion"][-1]["content"], label=record["label"])
        samples.append(sample)
    return samples


PREFER = Stage(
    name="prefer",
    plan=plan_preference,
    prepare=prepare_preferences,
    load=load_policy,
    rows=preference_rows,
    settings=run_settings,
    trainer=build_preference_trainer,
    baseline=baseline,
    measure=measure,
    metrics=preference_metrics,
    record=preference_record,
    card=render_preference_card,
    charts=draw_preference_charts,
    samples=sample_preferred_replies,
    card_charts=("chart_train.png", PREFER_CHART),
    stopped="preference tuning",
    nan_advice="a lower --learning-rate, a higher --beta",
)


def prefer(
    config: PreferConfig, callbacks: Sequence[TrainerCallback] | None = None, explicit: set[str] | None = None
) -> RunResult:
    """Preference-tune a model, measure it before and after, save and publish it: the whole run (runs.run_stage over
    PREFER).

    Args:
        config: the run's settings.
        callbacks: extra Trainer callbacks (tests use them to interrupt a run).
        explicit: the settings the user typed (see plan_preference).

    Returns:
        RunResult with the final metrics (also written to `<logs-dir>/metrics.json`).

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input or a stopped run, with a clear one-line message;
            everything that can be checked is checked before anything is written.
    """
    return run_stage(PREFER, config, explicit, callbacks)
