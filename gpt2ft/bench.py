"""Training throughput: gpt2ft's training path against the tutorial recipe, on the same model, data and hardware.

    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --dialogs 512 --steps 62 --batch-size 8
    python -m gpt2ft bench --model gpt2 --data hub --variants all            # on a GPU: adds fp16/bf16/fp32/compile
    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --variants tokenize

Every variant runs the real training path: the Trainer that `train` builds (`training.build_trainer`, the same
TrainingArguments, optimizer, precision and callbacks), on the first `--dialogs` training dialogues after cleaning and
de-duplication, `--batch-size` dialogues a step, from the same initial weights. The gpt2ft variants use gpt2ft's
collator and rows; the tutorial variants give the same Trainer the tutorial recipe's data. Evaluation and
checkpoints are switched off, and the DataLoader collates in the main process (so every batch's tokens are
counted); the first WARMUP_STEPS steps are not timed. Timing runs from the end of the last warm-up step to the end
of the last step, so it covers loading and collating batches, the forward and backward passes and the optimizer.
One JSON line is printed per variant, then ratio lines (`{"ratio": "gpt2ft_pack/tutorial_pad512", "value": ...}`:
real tokens per second of the first over the second).

Variants:
    tutorial_pad128, tutorial_pad512  the tutorial recipe: turns joined with spaces, padded (pad = EOS) and truncated
                                      to a fixed length, labels = a copy of input_ids (padding is trained on too)
    gpt2ft_pack                       gpt2ft's defaults: DialoGPT format, each batch packed into balanced rows of ~512
                                      tokens (position_ids restart per dialogue), no truncation (long dialogues are
                                      windowed)
    gpt2ft_pad                        `--batching pad`: dynamic padding to a multiple of 8, length-grouped batches
    gpt2ft_pack_1row                  gpt2ft_pack with the whole batch in one packed row (gpt2ft's first packing)
    gpt2ft_pack_gelu_tanh             gpt2ft_pack with activation_function="gelu_pytorch_tanh" (one fused kernel)
    gpt2ft_pack_vocab64               gpt2ft_pack with the vocabulary padded from 50257 to a multiple of 64
    gpt2ft_pack_fp16, gpt2ft_pack_bf16, gpt2ft_pack_fp32, gpt2ft_pack_compile, gpt2ft_pad_compile   (CUDA only)
    tokenize                          time to prepare and tokenise the whole train split, plain and cached
"default" = the first four; "all" adds the rest except tokenize (CUDA-only ones are reported as skipped on CPU).

What the fields mean:
    real_tokens        non-padding tokens in the timed steps (EOS separators of gpt2ft's format count: they are
                       trained on); real_tokens_per_s = real_tokens / timed seconds
    padded_tokens      padding slots processed (gpt2ft_pack: the segments that top packed rows up to one width);
                       target_tokens: positions with a loss (the tutorial's include its padding)
    truncated_tokens   tokens of the timed dialogues that never reach the model (tutorial: cut by truncation;
                       gpt2ft: 0 by construction, long dialogues are windowed)
    step_time_ms       timed seconds / timed steps
    peak_memory_mb     CUDA: torch.cuda.max_memory_allocated (MiB). CPU: peak resident set size of the whole process
                       (MB of 10**6 bytes; model, data and Python included), sampled every 5 ms by monitor.SystemMonitor
    mfu (CUDA only)    model FLOPs per second over the GPU's dense peak (PEAK_TFLOPS), counting for each real row of
                       L tokens 6*N*L + 12*n_layer*n_embd*L**2 (PaLM, appendix B: N = parameters without the position
                       embeddings; the tied lm_head counts once); padding and cross-dialogue attention are not
                       counted as useful work
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .data import IGNORE_INDEX, DialogueCollator, prepare_dialogs, tokenize_dialogs

DEFAULT_VARIANTS = ("tutorial_pad128", "tutorial_pad512", "gpt2ft_pack", "gpt2ft_pad")
EXTRA_VARIANTS = ("gpt2ft_pack_1row", "gpt2ft_pack_gelu_tanh", "gpt2ft_pack_vocab64")
GPU_VARIANTS = ("gpt2ft_pack_fp16", "gpt2ft_pack_bf16", "gpt2ft_pack_fp32", "gpt2ft_pack_compile", "gpt2ft_pad_compile")
ALL_VARIANTS = DEFAULT_VARIANTS + EXTRA_VARIANTS + GPU_VARIANTS
SPECIAL_VARIANTS = ("tokenize",)
WARMUP_STEPS = 2
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


class BenchError(ValueError):
    """A benchmark setting is invalid; the message names it."""


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # "tutorial" or "gpt2ft"
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
    "gpt2ft_pack_1row": Variant(
        "gpt2ft_pack_1row", "gpt2ft", collator_options=(("row_tokens", ONE_ROW), ("max_row_tokens", ONE_ROW), ("pad_to_multiple_of", 1))
    ),
    "gpt2ft_pack_gelu_tanh": Variant("gpt2ft_pack_gelu_tanh", "gpt2ft", activation="gelu_pytorch_tanh"),
    "gpt2ft_pack_vocab64": Variant("gpt2ft_pack_vocab64", "gpt2ft", vocab_multiple=64),
    "gpt2ft_pack_fp16": Variant("gpt2ft_pack_fp16", "gpt2ft", precision="fp16", cuda_only=True),
    "gpt2ft_pack_bf16": Variant("gpt2ft_pack_bf16", "gpt2ft", precision="bf16", cuda_only=True),
    "gpt2ft_pack_fp32": Variant("gpt2ft_pack_fp32", "gpt2ft", precision="fp32", cuda_only=True),
    # As training does under --compile: batch widths bucketed to multiples of 128, so a few shapes get compiled.
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
    """N for 6*N*tokens: every parameter except the position embeddings (a lookup, not a matmul); the tied
    lm_head / token embedding counts once, as the lm_head matmul."""
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


# --------------------------------------------------------------------------------------------------------------
# The two recipes' rows (tokenisation is not timed for either)
# --------------------------------------------------------------------------------------------------------------


def tutorial_rows(dialogs: list[list[str]], tokenizer: Any, length: int) -> tuple[Any, int]:
    """The tutorial recipe: " ".join(turns), padding="max_length", truncation, pad = EOS, labels = input_ids.

    Returns:
        (a Dataset of padded rows, tokens cut off by truncation per row, as a column), and the total cut.
    """
    from datasets import Dataset

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


class CountingCollator:
    """Wraps a collator and counts what the timed steps are fed: real (non-padding) tokens and padding slots, and
    per real row of L tokens the L and L**2 the FLOP count needs."""

    def __init__(self, collate: Callable[[list[dict]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate
        self.counting = False
        self.real = self.slots = self.targets = self.truncated = self.sum_len = self.sum_len_sq = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        if self.counting:
            lengths = [sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in features]
            self.real += sum(lengths)
            self.slots += batch["input_ids"].numel()
            self.targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            self.truncated += sum(f.get("truncated", 0) for f in features)
            self.sum_len += sum(lengths)
            self.sum_len_sq += sum(n * n for n in lengths)  # each dialogue's own attention, not the packed row's
        return batch


class StepClock(TrainerCallback):
    """Times the steps after the warm-up: from the end of the last warm-up step to the end of the last step."""

    def __init__(self, counter: CountingCollator, device: torch.device) -> None:
        self.counter, self.device = counter, device
        self.started: float | None = None
        self.elapsed = 0.0
        self.timed_steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        if state.global_step == WARMUP_STEPS:
            self.started = now
            self.counter.counting = True  # the batches fetched from here on belong to timed steps
        elif self.started is not None:
            self.elapsed, self.timed_steps = now - self.started, state.global_step - WARMUP_STEPS
        return control


# --------------------------------------------------------------------------------------------------------------
# One variant through the Trainer
# --------------------------------------------------------------------------------------------------------------


def prepare_model(base: Any, tokenizer: Any, variant: Variant) -> Any:
    """A fresh copy of the base weights with the variant's model changes."""
    model = copy.deepcopy(base)
    if variant.activation:
        from transformers.activations import ACT2FN

        model.config.activation_function = variant.activation
        for block in model.transformer.h:
            block.mlp.act = ACT2FN[variant.activation]
    if variant.vocab_multiple:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=variant.vocab_multiple, mean_resizing=False)
    return model


def run_variant(variant: Variant, base: Any, tokenizer: Any, rows: Any, config: Any, steps: int, output_dir: str) -> dict[str, Any]:
    """Train `variant` for WARMUP_STEPS + `steps` steps through training.build_trainer; return its record."""
    import dataclasses

    from .monitor import SystemMonitor
    from .training import LoadedModel, build_trainer, plan_run

    config = config.replace(
        batching=variant.batching, precision=variant.precision, compile=variant.compile, output_dir=os.path.join(output_dir, "model"),
        logs_dir=os.path.join(output_dir, "logs"), images_dir=os.path.join(output_dir, "images"),
    )
    plan = plan_run(config, explicit=set())
    # Timing only: no evaluation, no checkpoints, the main process collates (so every batch's tokens are counted).
    plan.args = dataclasses.replace(
        plan.args, eval_strategy="no", save_strategy="no", load_best_model_at_end=False, logging_steps=10**9, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    torch.manual_seed(0)  # the same dropout masks for every variant
    model = prepare_model(base, tokenizer, variant)
    trainer = build_trainer(plan, LoadedModel(model, tokenizer, {}), {"train": rows, "validation": rows}, settings={})
    if variant.recipe == "tutorial":
        collate: Any = TutorialCollator()
    else:
        bucket = 128 if variant.compile else None
        collate = DialogueCollator(tokenizer, variant.batching, bucket=bucket, **dict(variant.collator_options))
    counter = CountingCollator(collate)
    clock = StepClock(counter, plan.args.device)
    trainer.data_collator = counter
    trainer.add_callback(clock)
    for printer in (PrinterCallback, ProgressCallback):  # stdout carries the benchmark's JSON lines only
        trainer.remove_callback(printer)
    device = plan.args.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with SystemMonitor(None, 0.005, only=("memory",)) as memory:
        trainer.train()
    elapsed = clock.elapsed
    record: dict[str, Any] = {
        "variant": variant.name,
        "recipe": variant.recipe,
        "batching": f"fixed{variant.fixed_length}" if variant.recipe == "tutorial" else variant.batching,
        "max_length": max(rows["length"]),
        "device": plan.hardware.name,
        "precision": plan.precision,
        "steps": clock.timed_steps,
        "batch_size": config.batch_size,
        "real_tokens": counter.real,
        "padded_tokens": counter.slots - counter.real,
        "target_tokens": counter.targets,
        "truncated_tokens": counter.truncated,
        "real_tokens_per_s": round(counter.real / elapsed, 1) if elapsed > 0 else None,
        "step_time_ms": round(1000 * elapsed / max(1, clock.timed_steps), 2),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else round(memory.peak_rss_mb, 1),
        "last_loss": round(trainer.state.log_history[-1].get("train_loss", float("nan")), 4) if trainer.state.log_history else None,
        # Other processes on the machine slow a variant down; the 1-minute load average makes that visible.
        "load_avg_1m": load_average(),
    }
    if device.type == "cuda" and elapsed > 0:
        peak, source = peak_tflops(plan.hardware.name, plan.precision)
        n_layer, n_embd = model.config.n_layer, model.config.n_embd
        flops = 6 * flop_params(model) * counter.sum_len + 12 * n_layer * n_embd * counter.sum_len_sq
        record.update(
            mfu=round(flops / elapsed / (peak * 1e12), 4) if peak else None,
            mfu_formula="sum over real rows of 6*N*L + 12*n_layer*n_embd*L^2; N excludes wpe",
            peak_tflops=peak,
            peak_source=source,
        )
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------------------------------------------
# Tokenisation time
# --------------------------------------------------------------------------------------------------------------


def bench_tokenization(model: str, data: str, cache_dir: str) -> dict[str, Any]:
    """Seconds to prepare the whole data, tokenise the train split, and tokenise everything through the cache (cold,
    then warm)."""
    from transformers import AutoConfig

    from .data import tokenize_prepared
    from .modeling import config_context, load_tokenizer

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
    """gpt2ft's real-token throughput over each tutorial variant's (and packed over padded)."""
    speed = {r["variant"]: r["real_tokens_per_s"] for r in records if r.get("real_tokens_per_s")}
    ours_all = [name for name in speed if name.startswith("gpt2ft_")]
    pairs = [(ours, theirs) for ours in ours_all for theirs in ("tutorial_pad128", "tutorial_pad512")]
    pairs += [(ours, "gpt2ft_pad") for ours in ours_all if ours.startswith("gpt2ft_pack")]
    return [
        {"ratio": f"{ours}/{theirs}", "value": round(speed[ours] / speed[theirs], 3)}
        for ours, theirs in pairs
        if ours in speed and theirs in speed
    ]


def run_benchmarks(
    model: str, data: str, dialogs: int, steps: int, batch_size: int, variants: str, cache_dir: str, emit: Callable[[dict], None]
) -> list[dict]:
    """Run the variants one after another in this process; emit and return one record per variant, then the ratios.

    Raises:
        BenchError: an unknown variant.
    """
    from datasets import Dataset

    from .config import TrainConfig
    from .modeling import detect_hardware, load_model_and_tokenizer, model_context

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
    texts = [list(turns) for turns in prepare_dialogs(data, cache_dir, max_train_dialogs=dialogs).dialogs["train"]["dialog"]]
    emit(
        {
            "bench": "setup", "model": model, "params": sum(p.numel() for p in base.parameters()), "n_layer": base.config.n_layer,
            "n_embd": base.config.n_embd, "vocab_size": base.config.vocab_size, "dialogs": len(texts), "steps": steps,
            "warmup_steps": WARMUP_STEPS, "batch_size": batch_size, "device": hardware.name,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_avg_1m": load_average(),
        }
    )
    gpt2ft_rows = tokenize_dialogs(Dataset.from_dict({"dialog": texts}), tokenizer, context)
    rows_by_length: dict[int, Any] = {}
    # One dialogue a step row, however many steps: the schedule repeats the data if the steps need more.
    config = TrainConfig(model=model, data=data, cache_dir=cache_dir, batch_size=batch_size, max_steps=WARMUP_STEPS + steps, logging_steps=10**6)
    with tempfile.TemporaryDirectory(prefix="gpt2ft-bench-") as scratch:
        for variant in training:
            if variant.cuda_only and hardware.device != "cuda":
                out({"variant": variant.name, "skipped": "needs a CUDA GPU"})
                continue
            if variant.recipe == "tutorial":
                length = min(variant.fixed_length or context, context)  # past the context would index past wpe
                if length not in rows_by_length:
                    rows_by_length[length] = tutorial_rows(texts, tokenizer, length)[0]
                rows = rows_by_length[length]
            else:
                rows = gpt2ft_rows
            out(run_variant(variant, base, tokenizer, rows, config, steps, os.path.join(scratch, variant.name)))
    for line in ratio_lines(records):
        out(line)
    return records


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
