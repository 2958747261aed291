"""Training throughput: gpt2ft's batching against the tutorial recipe, on the same model, data and dialogues.

    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --dialogs 512 --steps 62 --batch-size 8
    python -m gpt2ft bench --model gpt2 --data hub --variants all            # on a GPU: adds fp16/fp32/compile
    python -m gpt2ft bench --model /tmp/models/tiny --data ../shared/data/dailydialog --variants tokenize

Each variant starts from the same weights (a deep copy of one loaded model), sees the same dialogues (the first
`--dialogs` training dialogues after cleaning and de-duplication, in one seeded order, `--batch-size` dialogues a
step) and runs the same tiny loop: forward with `use_cache=False`, `loss.backward()`, gradient clipping, AdamW
step, `zero_grad`. The first WARMUP_STEPS steps are not timed. One JSON line per variant is printed, then ratio lines
(`{"ratio": "gpt2ft_pack/tutorial_pad512", "value": ...}`: real tokens per second of the first over the second).

On CPU the timed steps run interleaved (step i of every variant, the order rotating each step), so that other
processes on a shared machine slow every variant alike; on CUDA one variant runs after another
(GPT2FT_BENCH_INTERLEAVE=0 or 1 overrides). Each record carries `load_avg_1m` and, on CPU, `cpu_share` (CPU seconds
the process got per wall second per thread): well below 0.9 means the machine was busy and the numbers are suspect.
Contention adds a roughly fixed cost to every op (each waits for its threads to be scheduled), which hurts the
small-batch variants most and compresses the ratios.

Variants:
    tutorial_pad128, tutorial_pad512  the tutorial recipe: turns joined with spaces, padded (pad = EOS) and truncated
                                      to a fixed length, labels = a copy of input_ids (padding is trained on too)
    gpt2ft_pack                       gpt2ft's defaults: DialoGPT format, the batch packed into balanced rows of ~512
                                      tokens (position_ids restart per dialogue; each row topped up to a multiple of 8
                                      with a padding segment), no truncation (long dialogues are windowed)
    gpt2ft_pad                        `--batching pad`: dynamic padding to a multiple of 8, length-grouped batches
    gpt2ft_pack_1row                  gpt2ft_pack with the whole batch in one packed row (the packing gpt2ft used
                                      before rows of ~512 tokens), for comparison
    gpt2ft_pack_gelu_tanh             gpt2ft_pack with activation_function="gelu_pytorch_tanh" (one fused kernel)
    gpt2ft_pack_vocab64               gpt2ft_pack with the vocabulary padded from 50257 to a multiple of 64
    gpt2ft_pack_fp16, gpt2ft_pack_fp32, gpt2ft_pack_compile, gpt2ft_pad_compile   (CUDA only)
    tokenize                          time to prepare and tokenise the whole train split, plain and cached
"default" = the first four; "all" adds the rest except tokenize (CUDA-only ones are reported as skipped on CPU).

What the fields mean:
    real_tokens        non-padding tokens in the timed forward passes (EOS separators of gpt2ft's format count:
                       they are trained on); real_tokens_per_s = real_tokens / timed seconds
    padded_tokens      padding slots processed (gpt2ft_pack: the segments that top packed rows up to one width);
                       target_tokens: positions with a loss (the tutorial's include its padding)
    truncated_tokens   tokens of the timed dialogues that never reach the model (tutorial: cut by truncation;
                       gpt2ft: dialogue tokens that are not a target of any window, 0 by construction)
    step_time_ms       timed seconds / steps, collation and host-to-device copy included, tokenisation excluded
    peak_memory_mb     CUDA: torch.cuda.max_memory_allocated. CPU: peak resident set size of the whole process
                       (model, data and Python included), sampled every 5 ms while the variant runs
    mfu (CUDA only)    model FLOPs per second over the GPU's dense peak (PEAK_TFLOPS), counting for each real row of
                       L tokens 6*N*L + 12*n_layer*n_embd*L**2 (PaLM, appendix B: N = parameters without the position
                       embeddings; the tied lm_head counts once); padding and cross-dialogue attention are not
                       counted as useful work
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .data import IGNORE_INDEX, DialogueCollator, prepare_dialogs, tokenize_dialogs

DEFAULT_VARIANTS = ("tutorial_pad128", "tutorial_pad512", "gpt2ft_pack", "gpt2ft_pad")
EXTRA_VARIANTS = ("gpt2ft_pack_1row", "gpt2ft_pack_gelu_tanh", "gpt2ft_pack_vocab64")
GPU_VARIANTS = ("gpt2ft_pack_fp16", "gpt2ft_pack_fp32", "gpt2ft_pack_compile", "gpt2ft_pad_compile")
ALL_VARIANTS = DEFAULT_VARIANTS + EXTRA_VARIANTS + GPU_VARIANTS
SPECIAL_VARIANTS = ("tokenize",)
WARMUP_STEPS = 2
SEED = 0
LEARNING_RATE = 5e-5  # gpt2ft's default; the value does not change the speed
# The Trainer builds length groups from mega-batches of 50 * batch_size rows (transformers' default for a dataset
# as large as DailyDialog's train split); using the same here keeps gpt2ft_pad's padding what training sees.
MEGA_BATCH_MULT = 50
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


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # "tutorial" or "gpt2ft"
    fixed_length: int | None = None  # tutorial: pad/truncate to this many tokens
    batching: str = "pack"  # gpt2ft: "pack" or "pad"
    collator_options: tuple[tuple[str, int], ...] = ()  # extra DialogueCollator arguments
    precision: str | None = None  # None: what gpt2ft would choose for the device
    compile: bool = False
    activation: str | None = None
    vocab_multiple: int | None = None
    cuda_only: bool = False


VARIANTS: dict[str, Variant] = {
    "tutorial_pad128": Variant("tutorial_pad128", "tutorial", fixed_length=128),
    "tutorial_pad512": Variant("tutorial_pad512", "tutorial", fixed_length=512),
    "gpt2ft_pack": Variant("gpt2ft_pack", "gpt2ft", batching="pack"),
    "gpt2ft_pad": Variant("gpt2ft_pad", "gpt2ft", batching="pad"),
    # Exactly the packing before rows of ~512 tokens: the whole batch in one row, no rounding of its width.
    "gpt2ft_pack_1row": Variant(
        "gpt2ft_pack_1row",
        "gpt2ft",
        collator_options=(("row_tokens", ONE_ROW), ("max_row_tokens", ONE_ROW), ("pad_to_multiple_of", 1)),
    ),
    "gpt2ft_pack_gelu_tanh": Variant("gpt2ft_pack_gelu_tanh", "gpt2ft", activation="gelu_pytorch_tanh"),
    "gpt2ft_pack_vocab64": Variant("gpt2ft_pack_vocab64", "gpt2ft", vocab_multiple=64),
    "gpt2ft_pack_fp16": Variant("gpt2ft_pack_fp16", "gpt2ft", precision="fp16", cuda_only=True),
    "gpt2ft_pack_fp32": Variant("gpt2ft_pack_fp32", "gpt2ft", precision="fp32", cuda_only=True),
    # As training does under --compile: batch widths bucketed to multiples of 128, so a few shapes get compiled.
    "gpt2ft_pack_compile": Variant(
        "gpt2ft_pack_compile", "gpt2ft", compile=True, cuda_only=True, collator_options=(("bucket", 128),)
    ),
    "gpt2ft_pad_compile": Variant(
        "gpt2ft_pad_compile",
        "gpt2ft",
        batching="pad",
        compile=True,
        cuda_only=True,
        collator_options=(("bucket", 128),),
    ),
}


def parse_variants(spec: str) -> list[str]:
    """'default', 'all' or a comma-separated list of variant names; an unknown name is a UsageError (exit 2)."""
    from .cli import UsageError

    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        expanded = {"default": DEFAULT_VARIANTS, "all": ALL_VARIANTS}.get(part, (part,))
        for name in expanded:
            if name not in VARIANTS and name not in SPECIAL_VARIANTS:
                known = ", ".join(("default", "all") + ALL_VARIANTS + SPECIAL_VARIANTS)
                raise UsageError(f"--variants: unknown variant {name!r} (known: {known})")
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError("--variants: no variant given")
    return names


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------


def release_freed_memory() -> None:
    """Return freed heap to the OS (and CUDA's cache) between variants run one after another."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):  # glibc only; elsewhere the RSS peaks are just less separable
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryTracker:
    """Peak memory attributed to whichever variant is running: CUDA max_memory_allocated, or on CPU the resident
    set size of the whole process, sampled every 5 ms by a background thread (model, data and Python included)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self.current: str | None = None
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss_peak"
        self._process: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryTracker":
        if self.device.type != "cuda":
            try:
                import psutil

                self._process = psutil.Process()
            except ImportError:  # without psutil: the lifetime peak, which includes every earlier variant
                self.kind = "process_ru_maxrss"
            else:
                self._thread = threading.Thread(target=self._sample_forever, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        name = self.current
        if name is not None and self._process is not None:
            self.peaks[name] = max(self.peaks.get(name, 0), self._process.memory_info().rss)

    def _sample_forever(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    @contextlib.contextmanager
    def attribute(self, name: str):
        """Count the memory used inside this block towards `name`."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.current = name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self.current = None
            if self.device.type == "cuda":
                self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            elif self._process is None:
                import resource

                self.peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def mb(self, name: str) -> float:
        return round(self.peaks.get(name, 0) / 2**20, 1)


def peak_tflops(device_name: str, precision: str) -> tuple[float | None, str]:
    for key, peaks, source in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            value = peaks.get(precision)
            return value, f"{source}: {value} TFLOP/s {precision}" if value else f"{source}: no {precision} peak listed"
    return None, f"{device_name}: not in gpt2ft.bench.PEAK_TFLOPS"


def flop_params(model: Any) -> int:
    """N for 6*N*tokens: every parameter except the position embeddings (a lookup, not a matmul); the tied
    lm_head / token embedding counts once, as the lm_head matmul."""
    total = sum(p.numel() for p in model.parameters())
    return total - model.transformer.wpe.weight.numel()


# --------------------------------------------------------------------------------------------------------------
# The two pipelines' data, built once per run (tokenisation is not timed for either)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """Per dialogue: the rows a variant feeds the model, and how many of the dialogue's tokens never get there."""

    rows: list[list[dict[str, list[int]]]]  # dialogue -> its rows (gpt2ft: windows; tutorial: one padded row)
    real: list[int]  # dialogue -> non-padding tokens in its rows
    truncated: list[int]  # dialogue -> tokens cut off
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    max_length: int | None = None


def tutorial_pipeline(dialogs: list[list[str]], tokenizer: Any, length: int) -> Pipeline:
    """The tutorial recipe: " ".join(turns), padding="max_length", truncation, pad = EOS, labels = input_ids."""
    texts = [" ".join(turns) for turns in dialogs]
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, add_special_tokens=False)
    rows, real = [], []
    for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"]):
        rows.append([{"input_ids": ids, "attention_mask": mask, "labels": list(ids)}])
        real.append(int(sum(mask)))
    truncated = [max(0, len(ids) - length) for ids in full]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:  # default_data_collator: stack the padded rows
        return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "attention_mask", "labels")}

    return Pipeline(rows, real, truncated, collate, max_length=length)


def gpt2ft_pipeline(
    dialogs: list[list[str]],
    tokenizer: Any,
    context: int,
    batching: str,
    collator_options: dict[str, int] | None = None,
) -> Pipeline:
    """gpt2ft's own path: tokenize_dialogs (DialoGPT format, windows of at most the context) + DialogueCollator."""
    from datasets import Dataset

    table = tokenize_dialogs(Dataset.from_dict({"dialog": dialogs}), tokenizer, context)
    rows: list[list[dict]] = [[] for _ in dialogs]
    targets = [0] * len(dialogs)
    columns = (table["input_ids"], table["labels"], table["n_targets"], table["dialog_index"])
    for ids, labels, n_targets, index in zip(*columns):
        rows[index].append({"input_ids": list(ids), "labels": list(labels)})
        targets[index] += n_targets
    # Every token of the format except the leading EOS is a target of exactly one window (loss_on="all"), so any
    # shortfall would be tokens dropped; this checks that rather than assuming it.
    turn_lengths = tokenizer([t for turns in dialogs for t in turns], add_special_tokens=False)["input_ids"]
    formatted, position = [], 0
    for turns in dialogs:
        formatted.append(sum(len(ids) + 1 for ids in turn_lengths[position : position + len(turns)]))
        position += len(turns)
    truncated = [max(0, total - got) for total, got in zip(formatted, targets)]
    real = [sum(len(r["input_ids"]) for r in dialogue_rows) for dialogue_rows in rows]
    collate = DialogueCollator(tokenizer, batching, **(collator_options or {}))
    return Pipeline(rows, real, truncated, collate, max_length=context)


def schedule(n_dialogs: int, steps: int, batch_size: int) -> tuple[list[int], list[int]]:
    """Dialogue indices for the warm-up and the timed steps: one seeded order, repeated if the steps need more."""
    order = list(range(n_dialogs))
    random.Random(SEED).shuffle(order)
    needed = (WARMUP_STEPS + steps) * batch_size
    sequence = (order * (needed // n_dialogs + 1))[:needed]
    return sequence[: WARMUP_STEPS * batch_size], sequence[WARMUP_STEPS * batch_size :]


def length_grouped(indices: list[int], lengths: list[int], batch_size: int) -> list[int]:
    """The timed dialogues in the order the Trainer's group_by_length sampler would give them."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(SEED)
    local = get_length_grouped_indices([lengths[i] for i in indices], batch_size, MEGA_BATCH_MULT, generator)
    return [indices[i] for i in local]


# --------------------------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------------------------


def prepare_model(base: Any, tokenizer: Any, variant: Variant, device: torch.device) -> Any:
    """A fresh copy of the base weights with the variant's model changes."""
    model = copy.deepcopy(base)
    if variant.activation:
        from transformers.activations import ACT2FN

        model.config.activation_function = variant.activation
        for block in model.transformer.h:
            block.mlp.act = ACT2FN[variant.activation]
    if variant.vocab_multiple:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=variant.vocab_multiple, mean_resizing=False)
    model.config.use_cache = False
    return model.to(device).train()


class VariantRun:
    """One variant's model, optimizer and batches, and what its timed steps processed.

    Steps can run all at once (`run_steps(range(n))`) or one at a time interleaved with other variants; either way
    only the time inside `run_steps` counts.
    """

    def __init__(
        self,
        variant: Variant,
        base: Any,
        tokenizer: Any,
        pipeline: Pipeline,
        warmup_ids: list[int],
        timed_ids: list[int],
        batch_size: int,
        device: torch.device,
        precision: str,
        device_name: str,
    ) -> None:
        self.variant, self.pipeline, self.device = variant, pipeline, device
        self.precision, self.device_name, self.batch_size = precision, device_name, batch_size
        if variant.recipe == "gpt2ft" and variant.batching == "pad":
            timed_ids = length_grouped(timed_ids, pipeline.real, batch_size)
        self.warmup_batches = self._batches(warmup_ids)
        self.timed_batches = self._batches(timed_ids)
        self.n_dialogs = len(timed_ids)
        torch.manual_seed(SEED)  # the same dropout masks for every variant
        self.model = prepare_model(base, tokenizer, variant, device)
        self.n_params = flop_params(self.model)
        self.forward = torch.compile(self.model) if variant.compile else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, fused=device.type == "cuda"
        )
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.elapsed = self.warmup_s = self.cpu_s = 0.0
        self.real = self.slots = self.targets = self.truncated = self.steps = 0
        self.sum_len = self.sum_len_sq = 0
        self.loss: torch.Tensor | None = None

    def _batches(self, ids: list[int]) -> list[tuple[list[int], list[dict]]]:
        batches = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            batches.append((chunk, [row for i in chunk for row in self.pipeline.rows[i]]))
        return batches

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole training step, the same for every variant."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        amp = torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with amp:
            loss = self.forward(**batch, use_cache=False).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # the Trainer clips too (max_grad_norm=1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def warmup(self) -> None:
        started = time.perf_counter()
        for _, features in self.warmup_batches:
            self._train_step(self.pipeline.collate(features))
        self._sync()
        self.warmup_s += time.perf_counter() - started

    def run_steps(self, indices: Any) -> None:
        self._sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        for index in indices:
            chunk, features = self.timed_batches[index]
            batch = self.pipeline.collate(features)
            # Counted on the host copy of the batch, before it moves: no device sync inside the timed loop.
            # Real tokens come from the rows (the tutorial's rows are pre-padded: their mask says which are real).
            lengths = [sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in features]
            self.real += sum(lengths)
            self.slots += batch["input_ids"].numel()
            self.targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            self.truncated += sum(self.pipeline.truncated[i] for i in chunk)
            self.sum_len += sum(lengths)
            self.sum_len_sq += sum(n * n for n in lengths)  # each dialogue's own attention, not the packed row's
            self.loss = self._train_step(batch)
            self.steps += 1
        self._sync()
        self.elapsed += time.perf_counter() - started
        self.cpu_s += time.process_time() - cpu_started

    def record(self, memory: MemoryTracker) -> dict[str, Any]:
        variant, elapsed = self.variant, self.elapsed
        record: dict[str, Any] = {
            "variant": variant.name,
            "recipe": variant.recipe,
            "batching": f"fixed{self.pipeline.max_length}" if variant.recipe == "tutorial" else variant.batching,
            "max_length": self.pipeline.max_length,
            **({"collator_options": dict(variant.collator_options)} if variant.collator_options else {}),
            "device": self.device_name,
            "precision": self.precision,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "dialogs": self.n_dialogs,
            "real_tokens": self.real,
            "padded_tokens": self.slots - self.real,
            "target_tokens": self.targets,
            "truncated_tokens": self.truncated,
            "real_tokens_per_s": round(self.real / elapsed, 1) if elapsed > 0 else None,
            "dialogs_per_s": round(self.n_dialogs / elapsed, 2) if elapsed > 0 else None,
            "step_time_ms": round(1000 * elapsed / max(1, self.steps), 2),
            "warmup_s": round(self.warmup_s, 3),
            "peak_memory_mb": memory.mb(variant.name),
            "peak_memory_kind": memory.kind,
            "last_loss": round(float(self.loss), 4) if self.loss is not None else None,
            # Other processes on the machine slow a variant down; the 1-minute load average makes that visible.
            "load_avg_1m": load_average(),
        }
        if self.device.type == "cpu" and elapsed > 0:
            # CPU seconds this process got per wall second per intra-op thread: ~1.0 on an idle machine, lower when
            # other processes take cores (then small-batch variants lose most: every op waits for its threads).
            record["cpu_share"] = round(self.cpu_s / (elapsed * torch.get_num_threads()), 2)
        if self.device.type == "cuda":
            peak, source = peak_tflops(self.device_name, self.precision)
            n_layer, n_embd = self.model.config.n_layer, self.model.config.n_embd
            flops = 6 * self.n_params * self.sum_len + 12 * n_layer * n_embd * self.sum_len_sq
            record.update(
                {
                    "mfu": round(flops / elapsed / (peak * 1e12), 4) if peak and elapsed > 0 else None,
                    "mfu_formula": "sum over real rows of 6*N*L + 12*n_layer*n_embd*L^2; N excludes wpe",
                    "flop_params": self.n_params,
                    "peak_tflops": peak,
                    "peak_source": source,
                }
            )
        return record

    def close(self) -> None:
        del self.forward, self.model, self.optimizer


# --------------------------------------------------------------------------------------------------------------
# Tokenisation time
# --------------------------------------------------------------------------------------------------------------


def bench_tokenization(model: str, data: str, cache_dir: str) -> dict[str, Any]:
    """Seconds to prepare the whole train split, tokenise it, and tokenise it through the cache (cold, then warm)."""
    from datasets import DatasetDict
    from transformers import AutoConfig

    from .data import tokenize_splits_cached
    from .modeling import config_context, load_tokenizer

    tokenizer = load_tokenizer(model)
    context = config_context(AutoConfig.from_pretrained(model))
    started = time.perf_counter()
    train = prepare_dialogs(data, cache_dir).dialogs["train"]
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = tokenize_dialogs(train, tokenizer, context)
    tokenize_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:  # a fresh cache: the first call writes it, the second reads it
        splits = DatasetDict({"train": train})
        started = time.perf_counter()
        tokenize_splits_cached(splits, tokenizer, context, cache_dir=folder)
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = tokenize_splits_cached(splits, tokenizer, context, cache_dir=folder)
        warm_s = time.perf_counter() - started
        assert cached["train"]["input_ids"] == rows["input_ids"]  # the cache returns what tokenising gives
    return {
        "variant": "tokenize",
        "dialogs": len(train),
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
    model: str,
    data: str,
    dialogs: int,
    steps: int,
    batch_size: int,
    variants: str,
    cache_dir: str,
    emit: Callable[[dict], None],
    interleave: bool | None = None,
) -> list[dict]:
    """Run the variants side by side in this process; emit and return one record per variant, then the ratios.

    Args:
        interleave: run the timed steps round-robin (step i of every variant, in an order that rotates each step)
            instead of one variant after another. The default is True on CPU, where other processes on a shared
            machine come and go and would otherwise slow down whichever variant happened to run then; False on
            CUDA, where a dedicated GPU gives steady timings and per-variant peak memory stays separable.
    """
    from .modeling import choose_precision, detect_hardware, load_model_and_tokenizer, model_context

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
    device = torch.device(hardware.device if hardware.device == "cuda" else "cpu")
    default_precision, _ = choose_precision("auto", hardware)
    if device.type == "cuda" and hardware.capability and hardware.capability >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True  # as build_training_args' tf32=True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    if interleave is None:  # GPT2FT_BENCH_INTERLEAVE=0/1 overrides the device default (the CLI has no flag for it)
        setting = os.environ.get("GPT2FT_BENCH_INTERLEAVE", "").strip()
        interleave = setting == "1" if setting in ("0", "1") else device.type != "cuda"

    base, tokenizer = load_model_and_tokenizer(model)
    context = model_context(base)
    prepared = prepare_dialogs(data, cache_dir, max_train_dialogs=dialogs)
    texts = [list(turns) for turns in prepared.dialogs["train"]["dialog"]]
    warmup_ids, timed_ids = schedule(len(texts), steps, batch_size)
    emit(
        {
            "bench": "setup",
            "model": model,
            "params": sum(p.numel() for p in base.parameters()),
            "n_layer": base.config.n_layer,
            "n_embd": base.config.n_embd,
            "vocab_size": base.config.vocab_size,
            "dialogs": len(texts),
            "steps": steps,
            "warmup_steps": WARMUP_STEPS,
            "batch_size": batch_size,
            "device": device_name,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": load_average(),
            "schedule": "interleaved" if interleave else "sequential",
        }
    )

    pipelines: dict[tuple, Pipeline] = {}

    def start(variant: Variant) -> VariantRun:
        if variant.recipe == "tutorial":
            # A fixed length past the model's context would index past its position embeddings.
            key: tuple = ("tutorial", min(variant.fixed_length or context, context))
            if key not in pipelines:
                pipelines[key] = tutorial_pipeline(texts, tokenizer, key[1])
        else:
            key = ("gpt2ft", variant.batching, variant.collator_options)
            if key not in pipelines:
                options = dict(variant.collator_options)
                pipelines[key] = gpt2ft_pipeline(texts, tokenizer, context, variant.batching, options)
        precision = variant.precision or default_precision
        return VariantRun(
            variant, base, tokenizer, pipelines[key], warmup_ids, timed_ids, batch_size, device, precision, device_name
        )

    runnable = [v for v in training if device.type == "cuda" or not v.cuda_only]
    with MemoryTracker(device) as memory:
        if interleave:
            memory.kind += " (interleaved: every variant's model and optimizer are resident)"
            runs = {v.name: start(v) for v in runnable}
            for run in runs.values():
                with memory.attribute(run.variant.name):
                    run.warmup()
            order = list(runs.values())
            for index in range(steps):
                shift = index % len(order)
                for run in order[shift:] + order[:shift]:
                    with memory.attribute(run.variant.name):
                        run.run_steps([index])
        for variant in training:
            if variant not in runnable:
                out({"variant": variant.name, "skipped": "needs a CUDA GPU"})
                continue
            if interleave:
                out(runs[variant.name].record(memory))
                continue
            release_freed_memory()  # so one variant's peak RSS does not carry into the next
            run = start(variant)
            with memory.attribute(variant.name):
                run.warmup()
                run.run_steps(range(steps))
            out(run.record(memory))
            run.close()
            del run
    for line in ratio_lines(records):
        out(line)
    return records


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    import platform

    return f"CPU: {platform.processor() or platform.machine()}"


def load_average() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return round(os.getloadavg()[0], 2)
    return None
