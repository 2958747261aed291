"""Training throughput: gpt2ft's training path against the tutorial recipe and a bare PyTorch loop, on the same
model, data and hardware.

    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --steps 30 --repeats 3
    python -m gpt2ft bench --model gpt2 --data hub --variants all            # on a GPU: adds fp16/bf16/fp32/compile
    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --variants tokenize

Every gpt2ft and tutorial variant runs the real training path: the Trainer that `train` builds
(`training.build_trainer`: the same TrainingArguments, optimizer, precision, callbacks and DataLoader workers), on
the first `--dialogs` training dialogues after cleaning and de-duplication, `--batch-size` dialogues a step, from the
same initial weights. The gpt2ft variants use gpt2ft's batches (`DialogueCollator.loader`) and loss; the tutorial
variants give the same Trainer the tutorial recipe's data and the model's own loss. `torch_loop` is the bare
minimum for comparison: the same model, batches, precision, loss and fused AdamW in a plain PyTorch loop, no
Trainer. Evaluation and checkpoints are switched off.

How a number is made fair:
    - Each variant is fed a fixed schedule of batches: WARMUP_STEPS untimed steps, plus one untimed batch of every
      shape the timed steps use that those did not already show (so no new shape is met while timed), then
      `--steps` timed steps. The batches are counted from the schedule, not in the collator, so collation runs
      where training runs it (in DataLoader workers on a GPU).
    - Timing runs from the end of the last warm-up step to the end of the last step, with the GPU synchronised at
      those two points only (a synchronisation every step would itself be overhead).
    - `--repeats N` runs the variants interleaved (A B C A B C ...), each run from a fresh copy of the model, so a
      slow start of the process or another job on the machine lands on every variant alike; each variant's line
      reports the median of its repeats, with the min and max.
One JSON line is printed per variant, then ratio lines (`{"ratio": "gpt2ft_pack/tutorial_pad512", "value": ...}`:
median real tokens per second of the first over the second).

Variants:
    tutorial_pad128, tutorial_pad512  the tutorial recipe: turns joined with spaces, padded (pad = EOS) and truncated
                                      to a fixed length, labels = a copy of input_ids (padding is trained on too),
                                      the model's own loss (full logits)
    gpt2ft_pack                       gpt2ft's defaults: DialoGPT format, packed rows of 512 tokens in a few fixed
                                      shapes (position_ids restart per dialogue, a block-diagonal mask), no truncation
                                      (long dialogues are windowed), the loss a chunk of positions at a time
    gpt2ft_pad                        `--batching pad`: one dialogue a row, widths from a fixed ladder
    torch_loop                        gpt2ft_pack's model, batches, precision and loss in a plain PyTorch loop with
                                      AdamW (fused on CUDA), clipping and a linear schedule: no Trainer
    gpt2ft_pack_1row                  gpt2ft_pack with the whole batch in one packed row (gpt2ft's first packing)
    gpt2ft_pack_gelu_tanh             gpt2ft_pack with activation_function="gelu_pytorch_tanh" (one fused kernel)
    gpt2ft_pack_vocab64               gpt2ft_pack with the vocabulary padded from 50257 to a multiple of 64
    gpt2ft_pack_fp16, gpt2ft_pack_bf16, gpt2ft_pack_fp32, gpt2ft_pack_compile, gpt2ft_pad_compile   (CUDA only)
    tokenize                          time to prepare and tokenise the whole train split, plain and cached
"default" = the first five; "all" adds the rest except tokenize (CUDA-only ones are reported as skipped on CPU).

What the fields mean:
    real_tokens        non-padding tokens in the timed steps (EOS separators of gpt2ft's format count: they are
                       trained on); real_tokens_per_s = real_tokens / timed seconds of the median repeat (the lower
                       middle one of an even number), with real_tokens_per_s_min and _max over all repeats; the other
                       fields are the median repeat's
    padded_tokens      padding slots processed; target_tokens: positions with a loss (the tutorial's include its
                       padding)
    truncated_tokens   tokens of the timed dialogues that never reach the model (tutorial: cut by truncation;
                       gpt2ft: 0 by construction, long dialogues are windowed)
    shapes             distinct input shapes in the timed steps; warmup_steps: untimed steps before them
    step_time_ms       timed seconds / timed steps
    peak_memory_mb     CUDA: torch.cuda.max_memory_allocated (MiB). CPU: peak resident set size of the whole process
                       (MB of 10**6 bytes; model, data and Python included), sampled every 50 ms
    mfu (CUDA only)    model FLOPs per second over the GPU's dense peak (PEAK_TFLOPS), counting for each real row of
                       L tokens 6*N*L + 12*n_layer*n_embd*L**2 (PaLM, appendix B: N = parameters without the position
                       embeddings; the tied lm_head counts once); padding and cross-dialogue attention are not
                       counted as useful work
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoConfig, TrainerCallback
from transformers.activations import ACT2FN
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .config import TrainConfig
from .conversations import turns_of
from .data import (
    DialogueCollator,
    column,
    dialogs_dataset,
    prepare_dialogs,
    tokenize_dialogs,
    tokenize_prepared,
    window_lengths,
)
from .errors import Gpt2ftError
from .loss import core_model, use_chunked_loss
from .modeling import (
    autocast_context,
    config_context,
    detect_hardware,
    load_model_and_tokenizer,
    load_tokenizer,
    model_context,
)
from .monitor import SystemMonitor
from .training import LoadedModel, build_trainer, plan_run

DEFAULT_VARIANTS = ("tutorial_pad128", "tutorial_pad512", "gpt2ft_pack", "gpt2ft_pad", "torch_loop")
EXTRA_VARIANTS = ("gpt2ft_pack_1row", "gpt2ft_pack_gelu_tanh", "gpt2ft_pack_vocab64")
GPU_VARIANTS = ("gpt2ft_pack_fp16", "gpt2ft_pack_bf16", "gpt2ft_pack_fp32", "gpt2ft_pack_compile", "gpt2ft_pad_compile")
ALL_VARIANTS = DEFAULT_VARIANTS + EXTRA_VARIANTS + GPU_VARIANTS
SPECIAL_VARIANTS = ("tokenize",)
WARMUP_STEPS = 3  # untimed steps before the timed ones, besides one of each shape they use
# A row_tokens no batch reaches: the whole batch in one packed row (gpt2ft's packing before rows of ~512 tokens).
ONE_ROW = 10**9

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s. "fp32" is TF32 where gpt2ft enables it
# (compute capability >= 8.0), plain FP32 otherwise. The first matching name wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float], str]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}, "H100 PCIe data sheet, dense"),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.0}, "H100 NVL data sheet, dense"),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}, "H100 SXM data sheet, dense"),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}, "H200 SXM data sheet, dense"),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, "A100 data sheet, dense (fp32 = TF32)"),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}, "L4 data sheet, dense"),
    ("V100", {"fp16": 125.0, "fp32": 15.7}, "V100 SXM2 data sheet"),
    # T4: 65 TFLOP/s fp16 is the spec; sustained matmuls reach roughly 40-45 in practice (clock throttling at 70 W).
    ("T4", {"fp16": 65.0, "fp32": 8.1}, "T4 data sheet (spec; ~40-45 sustained in practice)"),
]


class BenchError(Gpt2ftError, ValueError):
    """A benchmark setting is invalid; the message names it."""


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # "tutorial", "gpt2ft" or "torch_loop"
    fixed_length: int | None = None  # tutorial: pad/truncate to this many tokens
    batching: str = "pack"  # gpt2ft: "pack" or "pad"
    collator_options: tuple[tuple[str, int], ...] = ()  # extra DialogueCollator arguments
    precision: str = "auto"
    compile: bool = False
    activation: str | None = None
    vocab_multiple: int | None = None
    cuda_only: bool = False


VARIANTS: dict[str, Variant] = {
    "tutorial_pad128": Variant("tutorial_pad128", "tutorial", fixed_length=128),
    "tutorial_pad512": Variant("tutorial_pad512", "tutorial", fixed_length=512),
    "gpt2ft_pack": Variant("gpt2ft_pack", "gpt2ft"),
    "gpt2ft_pad": Variant("gpt2ft_pad", "gpt2ft", batching="pad"),
    "torch_loop": Variant("torch_loop", "torch_loop"),
    "gpt2ft_pack_1row": Variant("gpt2ft_pack_1row", "gpt2ft", collator_options=(("row_tokens", ONE_ROW),)),
    "gpt2ft_pack_gelu_tanh": Variant("gpt2ft_pack_gelu_tanh", "gpt2ft", activation="gelu_pytorch_tanh"),
    "gpt2ft_pack_vocab64": Variant("gpt2ft_pack_vocab64", "gpt2ft", vocab_multiple=64),
    "gpt2ft_pack_fp16": Variant("gpt2ft_pack_fp16", "gpt2ft", precision="fp16", cuda_only=True),
    "gpt2ft_pack_bf16": Variant("gpt2ft_pack_bf16", "gpt2ft", precision="bf16", cuda_only=True),
    "gpt2ft_pack_fp32": Variant("gpt2ft_pack_fp32", "gpt2ft", precision="fp32", cuda_only=True),
    # As training does under --compile: gpt2ft's few fixed shapes make a few graphs.
    "gpt2ft_pack_compile": Variant("gpt2ft_pack_compile", "gpt2ft", compile=True, cuda_only=True),
    "gpt2ft_pad_compile": Variant("gpt2ft_pad_compile", "gpt2ft", batching="pad", compile=True, cuda_only=True),
}


def parse_variants(spec: str) -> list[str]:
    """'default', 'all' or a comma-separated list of variant names.

    Raises:
        BenchError: an unknown name, or none.
    """
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for name in {"default": DEFAULT_VARIANTS, "all": ALL_VARIANTS}.get(part, (part,)):
            if name not in VARIANTS and name not in SPECIAL_VARIANTS:
                known = ", ".join(("default", "all") + ALL_VARIANTS + SPECIAL_VARIANTS)
                raise BenchError(f"--variants: unknown variant {name!r} (known: {known})")
            if name not in names:
                names.append(name)
    if not names:
        raise BenchError("--variants: no variant given")
    return names


def peak_tflops(device_name: str, precision: str) -> tuple[float | None, str]:
    for key, peaks, source in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            value = peaks.get(precision)
            return value, f"{source}: {value} TFLOP/s {precision}" if value else f"{source}: no {precision} peak listed"
    return None, f"{device_name}: not in gpt2ft.bench.PEAK_TFLOPS"


def flop_params(model: Any) -> int:
    """N for 6*N*tokens: every parameter except learned position embeddings (GPT-2's, a lookup, not a matmul; the
    rotary families have none); the tied lm_head / token embedding counts once, as the lm_head matmul."""
    try:
        positions = model.get_position_embeddings().weight.numel()
    except (NotImplementedError, AttributeError):
        positions = 0
    return sum(p.numel() for p in model.parameters()) - positions


# --------------------------------------------------------------------------------------------------------------
# The two recipes' rows (tokenisation is not timed for either)
# --------------------------------------------------------------------------------------------------------------


def tutorial_rows(dialogs: list[list[str]], tokenizer: Any, length: int) -> tuple[Any, int]:
    """The tutorial recipe: " ".join(turns), padding="max_length", truncation, pad = EOS, labels = input_ids.

    Returns:
        (a Dataset of padded rows, tokens cut off by truncation per row, as a column), and the total cut.
    """
    texts = [" ".join(turns) for turns in dialogs]
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, add_special_tokens=False)
    rows = Dataset.from_dict(
        {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": encoded["input_ids"],
            "length": [length] * len(texts),
            "truncated": [max(0, len(ids) - length) for ids in full],
        }
    )
    return rows, sum(rows["truncated"])


class TutorialCollator:
    """default_data_collator for the pre-padded rows: stack them."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "attention_mask", "labels")}


# --------------------------------------------------------------------------------------------------------------
# The schedule: which batches a variant is fed, and what they hold
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """A variant's batches in the order it is fed them (lists of dataset indices), the first `warmup` untimed."""

    dataset: Any  # what the DataLoader indexes (PackedRows for gpt2ft, the tutorial's padded rows)
    collate: Callable[[list], dict[str, torch.Tensor]]
    batches: list[list[int]]
    warmup: int
    counts: dict[str, int]  # of the timed batches: real, slots, targets, truncated, sum_len, sum_len_sq, shapes


def timed_schedule(
    batches: list[list[int]], shape_of: Callable[[list[int]], tuple[int, ...]], steps: int
) -> tuple[list[list[int]], int]:
    """WARMUP_STEPS batches, then one batch of each shape the timed batches use that the warm-up has not shown yet
    (taken from after the timed ones, or else repeated from them), then `steps` timed batches.

    Returns:
        (the batches in order, how many of them are warm-up)
    """
    if len(batches) < WARMUP_STEPS + steps:
        raise BenchError(
            f"--steps {steps}: the data gives only {len(batches)} batches; use more --dialogs or fewer --steps"
        )
    warmup, timed, rest = (
        batches[:WARMUP_STEPS],
        batches[WARMUP_STEPS : WARMUP_STEPS + steps],
        batches[WARMUP_STEPS + steps :],
    )
    seen = {shape_of(batch) for batch in warmup}
    for shape in dict.fromkeys(shape_of(batch) for batch in timed):
        if shape not in seen:
            warmup.append(
                next(
                    (batch for batch in rest if shape_of(batch) == shape),
                    next(b for b in timed if shape_of(b) == shape),
                )
            )
            seen.add(shape)
    return warmup + timed, len(warmup)


def gpt2ft_schedule(collator: DialogueCollator, rows: Any, batch_size: int, steps: int, seed: int) -> Schedule:
    """gpt2ft's batches exactly as training draws them (DialogueCollator.loader, epoch after epoch as needed)."""
    loader = collator.loader(rows, batch_size, shuffle=True, seed=seed)
    sampler, dataset, shapes = loader.batch_sampler, loader.dataset, loader.batch_sampler.shapes
    lengths, targets = window_lengths(rows), rows["n_targets"]
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < WARMUP_STEPS + 2 * steps:  # enough to take each shape's warm-up batch from outside the timed
        sampler.set_epoch(epoch)
        batches += sampler.batches()
        epoch += 1

    def width(batch: list[int]) -> int:
        return shapes.width_for(max(sum(lengths[i] for i in row) for row in batch))

    def shape_of(batch: list[int]) -> tuple[int, int]:
        return (shapes.rows_for(width(batch)), width(batch))

    ordered, warmup = timed_schedule(batches, shape_of, steps)
    counts = dict.fromkeys(("real", "slots", "targets", "truncated", "sum_len", "sum_len_sq"), 0)
    for batch in ordered[warmup:]:
        windows = [i for row in batch for i in row]
        counts["real"] += sum(lengths[i] for i in windows)
        counts["slots"] += shapes.rows_for(width(batch)) * width(batch)
        counts["targets"] += sum(targets[i] for i in windows)
        counts["sum_len"] += sum(lengths[i] for i in windows)
        counts["sum_len_sq"] += sum(lengths[i] ** 2 for i in windows)  # each dialogue's own attention
    counts["shapes"] = len({shape_of(batch) for batch in ordered[warmup:]})
    return Schedule(dataset, loader.collate_fn, ordered, warmup, counts)


def tutorial_schedule(rows: Any, batch_size: int, steps: int, seed: int) -> Schedule:
    """Full batches of the tutorial's fixed-length rows in a seeded random order (one shape)."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    while len(order) < (WARMUP_STEPS + steps) * batch_size:
        order += order
    batches = [order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]
    ordered, warmup = timed_schedule(batches, lambda batch: (len(batch),), steps)
    real_lengths = [sum(mask) for mask in rows["attention_mask"]]
    width, truncated = rows["length"][0], rows["truncated"]
    counts = dict.fromkeys(("real", "slots", "targets", "truncated", "sum_len", "sum_len_sq"), 0)
    for batch in ordered[warmup:]:
        counts["real"] += sum(real_lengths[i] for i in batch)
        counts["slots"] += width * len(batch)
        counts["targets"] += (width - 1) * len(batch)  # labels = input_ids: every slot after the first, padding too
        counts["truncated"] += sum(truncated[i] for i in batch)
        counts["sum_len"] += sum(real_lengths[i] for i in batch)
        counts["sum_len_sq"] += sum(real_lengths[i] ** 2 for i in batch)
    counts["shapes"] = 1
    return Schedule(rows, TutorialCollator(), ordered, warmup, counts)


def schedule_loader(schedule: Schedule, num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        schedule.dataset,
        batch_sampler=schedule.batches,
        collate_fn=schedule.collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


class StepClock(TrainerCallback):
    """Times the steps after the warm-up: from the end of the last warm-up step to the end of the last step, with
    the device synchronised at those two points only."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.started: float | None = None
        self.elapsed = 0.0
        self.timed_steps = 0

    def mark(self, step: int, last: int) -> None:
        if step == self.warmup or step == last:
            synchronize(self.device)
            now = time.perf_counter()
            if step == self.warmup:
                self.started = now
            else:
                self.elapsed, self.timed_steps = now - self.started, step - self.warmup

    def on_step_end(self, args, state, control, **kwargs):
        self.mark(state.global_step, state.max_steps)
        return control


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------------
# One run of a variant
# --------------------------------------------------------------------------------------------------------------


def prepare_model(base: Any, tokenizer: Any, variant: Variant) -> Any:
    """A fresh copy of the base weights with the variant's model changes."""
    model = copy.deepcopy(base)
    if variant.activation:
        if model.config.model_type != "gpt2":
            raise BenchError(
                f"variant {variant.name}: changes GPT-2's activation; --model is {model.config.model_type}"
            )
        model.config.activation_function = variant.activation
        for block in model.base_model.h:
            block.mlp.act = ACT2FN[variant.activation]
    if variant.vocab_multiple:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=variant.vocab_multiple, mean_resizing=False)
    return model


def bench_plan(variant: Variant, config: Any, output_dir: str, steps: int) -> Any:
    """The run plan `train` would make for this variant's settings, timing only: no evaluation, no checkpoints."""
    config = config.replace(
        batching=variant.batching,
        precision=variant.precision,
        compile=variant.compile,
        output_dir=os.path.join(output_dir, "model"),
        logs_dir=os.path.join(output_dir, "logs"),
        images_dir=os.path.join(output_dir, "images"),
        max_steps=steps,
    )
    plan = plan_run(config, explicit=set())
    plan.args = dataclasses.replace(
        plan.args,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=10**9,
        disable_tqdm=True,
    )
    return plan


def train_variant(
    variant: Variant, model: Any, tokenizer: Any, schedule: Schedule, plan: Any
) -> tuple[float, int, float | None]:
    """Train through training.build_trainer on the schedule; (timed seconds, timed steps, last logged loss)."""
    trainer = build_trainer(
        plan,
        LoadedModel(model, tokenizer, {}),
        {"train": schedule.dataset, "validation": schedule.dataset},
        settings={},
    )
    if variant.recipe == "tutorial":
        vars(core_model(model)).pop("forward", None)  # the tutorial recipe: the model's own loss, full logits
    args = plan.args
    loader = schedule_loader(schedule, args.dataloader_num_workers, args.dataloader_pin_memory)
    trainer.get_train_dataloader = lambda accelerator=trainer.accelerator: accelerator.prepare(
        loader
    )  # the schedule, not an epoch
    clock = StepClock(schedule.warmup, args.device)
    trainer.add_callback(clock)
    for printer in (PrinterCallback, ProgressCallback):  # stdout carries the benchmark's JSON lines only
        trainer.remove_callback(printer)
    trainer.train()
    last_loss = trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None
    del trainer
    return clock.elapsed, clock.timed_steps, last_loss


def run_torch_loop(model: Any, schedule: Schedule, plan: Any) -> tuple[float, int, float | None]:
    """The bare minimum: the same model, batches, precision and loss, fused AdamW (foreach on the CPU), gradient
    clipping and a linear warm-up/decay schedule, in a plain loop."""
    config, device = plan.config, plan.args.device
    model = use_chunked_loss(model).to(device).train()
    model.config.use_cache = False
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        fused=device.type == "cuda",
    )
    total = len(schedule.batches)
    warm = max(1, int(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm)))
    )
    scaler = torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None
    clock = StepClock(schedule.warmup, device)
    loss_sum = torch.zeros((), device=device)
    for step, batch in enumerate(
        schedule_loader(schedule, plan.args.dataloader_num_workers, plan.args.dataloader_pin_memory), start=1
    ):
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with autocast_context(plan.precision, device):
            loss = model(**batch).loss
        loss_sum += loss.detach().float()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        clock.mark(step, total)
    return clock.elapsed, clock.timed_steps, float(loss_sum) / total  # the mean step loss, as the Trainer's train_loss


def run_variant(
    variant: Variant, base: Any, tokenizer: Any, schedule: Schedule, config: Any, output_dir: str
) -> dict[str, Any]:
    """One run of `variant` on its schedule, from a fresh copy of the base weights; its record."""
    plan = bench_plan(variant, config, output_dir, len(schedule.batches))
    device = plan.args.device
    if variant.compile:
        # Compiled graphs are cached per code object, across model copies: without a reset, the variants compiled
        # before would use up torch._dynamo's recompile limit and later shapes would quietly run eagerly.
        torch._dynamo.reset()
    torch.manual_seed(0)  # the same dropout masks for every variant
    model = prepare_model(base, tokenizer, variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Process memory on the CPU only: on a GPU the allocator's own peak is exact and needs no sampling thread.
    with SystemMonitor(None, 0.05, only=("memory",)) if device.type != "cuda" else contextlib.nullcontext() as memory:
        if variant.recipe == "torch_loop":
            elapsed, timed_steps, last_loss = run_torch_loop(model, schedule, plan)
        else:
            elapsed, timed_steps, last_loss = train_variant(variant, model, tokenizer, schedule, plan)
    counts = schedule.counts
    record: dict[str, Any] = {
        "variant": variant.name,
        "recipe": variant.recipe,
        "batching": f"fixed{variant.fixed_length}" if variant.recipe == "tutorial" else variant.batching,
        "device": plan.hardware.name,
        "precision": plan.precision,
        "steps": timed_steps,
        "warmup_steps": schedule.warmup,
        "shapes": counts["shapes"],
        "batch_size": config.batch_size,
        "real_tokens": counts["real"],
        "padded_tokens": counts["slots"] - counts["real"],
        "target_tokens": counts["targets"],
        "truncated_tokens": counts["truncated"],
        "real_tokens_per_s": round(counts["real"] / elapsed, 1) if elapsed > 0 else None,
        "step_time_ms": round(1000 * elapsed / max(1, timed_steps), 2),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if device.type == "cuda"
        else round(memory.peak_rss_mb, 1),
        "last_loss": round(last_loss, 4) if last_loss is not None else None,
        # Other processes on the machine slow a variant down; the 1-minute load average makes that visible.
        "load_avg_1m": load_average(),
    }
    if device.type == "cuda" and elapsed > 0:
        peak, source = peak_tflops(plan.hardware.name, plan.precision)
        n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
        flops = 6 * flop_params(model) * counts["sum_len"] + 12 * n_layer * n_embd * counts["sum_len_sq"]
        record.update(
            mfu=round(flops / elapsed / (peak * 1e12), 4) if peak else None,
            mfu_formula="sum over real rows of 6*N*L + 12*n_layer*n_embd*L^2; N excludes wpe",
            peak_tflops=peak,
            peak_source=source,
        )
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput (the lower middle one of an even number), with the spread of all."""
    speeds = [run["real_tokens_per_s"] for run in runs if run.get("real_tokens_per_s") is not None]
    if not speeds:
        return {**runs[0], "repeats": len(runs)}
    middle = sorted(runs, key=lambda run: run.get("real_tokens_per_s") or 0.0)[(len(runs) - 1) // 2]
    return {
        **middle,
        "real_tokens_per_s_min": min(speeds),
        "real_tokens_per_s_max": max(speeds),
        "repeats": len(runs),
    }


# --------------------------------------------------------------------------------------------------------------
# Tokenisation time
# --------------------------------------------------------------------------------------------------------------


def bench_tokenization(model: str, data: str, cache_dir: str) -> dict[str, Any]:
    """Seconds to prepare the whole data, tokenise the train split, and tokenise everything through the cache (cold,
    then warm)."""
    tokenizer = load_tokenizer(model)
    context = config_context(AutoConfig.from_pretrained(model))
    started = time.perf_counter()
    prepared = prepare_dialogs(data, cache_dir)
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = tokenize_dialogs(prepared.dialogs["train"], tokenizer, context, prepared.loss_on)
    tokenize_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:  # a fresh cache: the first call writes it, the second reads it
        started = time.perf_counter()
        tokenize_prepared(prepared, tokenizer, context, cache_dir=folder)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = tokenize_prepared(prepared, tokenizer, context, cache_dir=folder)
        warm_s = time.perf_counter() - started
        if cached["train"]["input_ids"] != rows["input_ids"]:
            raise RuntimeError("the tokenisation cache returned other rows than tokenising gives")
    return {
        "variant": "tokenize",
        "dialogs": len(prepared.dialogs["train"]),
        "rows": len(rows),
        "tokens": int(sum(rows["length"])),
        "prepare_s": round(prepare_s, 3),
        "tokenize_s": round(tokenize_s, 3),
        "cached_cold_s": round(cold_s, 3),
        "cached_warm_s": round(warm_s, 3),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def ratio_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median real-token throughput of gpt2ft's variants over each tutorial variant's and the bare loop's (and
    packed over padded)."""
    speed = {r["variant"]: r["real_tokens_per_s"] for r in records if r.get("real_tokens_per_s")}
    ours_all = [name for name in speed if name.startswith("gpt2ft_")]
    pairs = [(ours, theirs) for ours in ours_all for theirs in ("tutorial_pad128", "tutorial_pad512", "torch_loop")]
    pairs += [(ours, "gpt2ft_pad") for ours in ours_all if ours.startswith("gpt2ft_pack")]
    return [
        {"ratio": f"{ours}/{theirs}", "value": round(speed[ours] / speed[theirs], 3)}
        for ours, theirs in pairs
        if ours in speed and theirs in speed
    ]


def run_benchmarks(
    model: str,
    data: str,
    dialogs: int,
    steps: int,
    batch_size: int,
    variants: str,
    cache_dir: str,
    emit: Callable[[dict], None],
    repeats: int = 3,
) -> list[dict]:
    """Run the variants `repeats` times, interleaved; emit and return one record per variant (the median repeat),
    then the ratios.

    Raises:
        BenchError: an unknown variant, or too few dialogues for the steps.
    """
    names = parse_variants(variants)
    records: list[dict] = []

    def out(record: dict) -> None:
        records.append(record)
        emit(record)

    if "tokenize" in names:
        out(bench_tokenization(model, data, cache_dir))
    training = [VARIANTS[n] for n in names if n in VARIANTS]
    if not training:
        return records

    hardware = detect_hardware()
    base, tokenizer = load_model_and_tokenizer(model)
    context = model_context(base)
    train = prepare_dialogs(data, cache_dir, max_train_dialogs=dialogs).dialogs["train"]
    texts = [turns_of(messages) for messages in column(train, "messages")]
    emit(
        {
            "bench": "setup",
            "model": model,
            "params": sum(p.numel() for p in base.parameters()),
            "n_layer": base.config.num_hidden_layers,
            "n_embd": base.config.hidden_size,
            "vocab_size": base.config.vocab_size,
            "dialogs": len(texts),
            "steps": steps,
            "warmup_steps": WARMUP_STEPS,
            "repeats": repeats,
            "batch_size": batch_size,
            "device": hardware.name,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": load_average(),
        }
    )
    config = TrainConfig(model=model, data=data, cache_dir=cache_dir, batch_size=batch_size, logging_steps=10**6)
    gpt2ft_rows = tokenize_dialogs(dialogs_dataset(texts), tokenizer, context)  # the tutorial's turns, no roles
    schedules: dict[str, Schedule] = {}
    for variant in training:
        if variant.cuda_only and hardware.device != "cuda":
            continue
        if variant.recipe == "tutorial":
            length = min(variant.fixed_length or context, context)  # past the context would index past wpe
            schedules[variant.name] = tutorial_schedule(
                tutorial_rows(texts, tokenizer, length)[0], batch_size, steps, config.seed
            )
        else:
            collator = DialogueCollator(tokenizer, variant.batching, **dict(variant.collator_options))
            schedules[variant.name] = gpt2ft_schedule(collator, gpt2ft_rows, batch_size, steps, config.seed)
    runs: dict[str, list[dict]] = {variant.name: [] for variant in training}
    with tempfile.TemporaryDirectory(prefix="gpt2ft-bench-") as scratch:
        for _ in range(repeats):
            for variant in training:
                if variant.name in schedules:
                    runs[variant.name].append(
                        run_variant(
                            variant,
                            base,
                            tokenizer,
                            schedules[variant.name],
                            config,
                            os.path.join(scratch, variant.name),
                        )
                    )
    for variant in training:
        out(
            median_record(runs[variant.name])
            if runs[variant.name]
            else {"variant": variant.name, "skipped": "needs a CUDA GPU"}
        )
    for line in ratio_lines(records):
        out(line)
    return records


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
