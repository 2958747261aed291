"""The GPU memory a run needs, estimated before any weight loads: weights, gradients, optimizer states and
activations, from the model's config, the method, the optimizer, the precision and the micro-batch.

    python -m gpt2ft train --model gpt2-large
        # memory estimate on Tesla T4 (14.7 GiB), 2,048 tokens a micro-batch:
        #   weights 2.9 + grads 2.9 + 8-bit AdamW 1.4 + activations 1.4 = 8.6 GiB
    python -m gpt2ft train --model gpt2-xl --no-t4-presets
        # error: gpt2-xl: full fine-tuning with AdamW at --batch-size 16 needs ~68.4 GiB (...), the Tesla T4 has
        #   14.7 GiB: --method lora --gradient-checkpointing (~11.2 GiB) fits

runs.plan_stage calls `check_memory` on CUDA, after the T4 presets (scale.choose_presets, which uses
`estimate_run` to pick settings that fit): it prints the estimate as one line, or stops with one line saying which
settings fit, where the run would otherwise run out of memory minutes later. The model's shape comes from
transformers itself: the model is built on the meta device (no memory, no weights), so its parameter count
(`num_parameters`), its adaptable modules and their shapes are the library's, for every family.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import PreferConfig, RunConfig, render_flag
from .errors import ConfigError, TrainingError

GIB = 2**30
# Device memory torch's allocator never gets: the CUDA context and cuBLAS/cuDNN workspaces (~0.3-0.5 GB).
CUDA_RESERVE_GIB = 0.5
EIGHT_BIT_OPTIM = "adamw_bnb_8bit"
# Packed rows are this wide (data.ROW_TOKENS; not imported, to keep this module light).
ROW_TOKENS = 512
# Positions a chunk of gpt2ft's chunked loss (loss.LOSS_CHUNK; not imported, to keep torch out of the CLI's checks).
LOSS_CHUNK = 1024
# Activations are counted 5% high: the caching allocator rounds blocks up, and a few transients are left out (the
# input embedding's dense gradient at the end of the backward pass, the fp32 head gradient's scaling product).
#
# Checked on CPU against a measured peak: peak RSS (VmHWM, reset through /proc/self/clear_refs; glibc set to mmap
# every block over 64 KiB so freed memory leaves RSS) of one forward + backward through gpt2ft's chunked loss, above
# the memory held before it. fp32 (the formula's fp32 case), activations alone (the previous step's gradients held,
# as under accumulation), estimate before the 5%:
#     GPT-2 124M, 4 x 512 tokens: measured 2.91 GiB, estimated 2.85 (0.98)
#     GPT-2 124M, 8 x 512, checkpointing: measured 0.91 GiB, estimated 1.28 (1.41)
#     SmolLM2-135M (Llama, 30 blocks), 2 x 256: measured 1.02 GiB, estimated 1.03 (1.01)
# Gradients and activations together, gradients freed before the step (accumulation 1, where the estimate counts
# both in full though the backward pass frees one as it makes the other):
#     GPT-2 fp32 2 x 256 / 8 x 256 / 4 x 512: measured 0.93 / 2.88 / 2.91 GiB, estimated 1.33 / 3.29 / 3.31;
#     bf16 autocast 1 x 512 / 2 x 256 / 4 x 512: 1.03 / 1.03 / 2.12 GiB, estimated 1.30 / 1.30 / 2.39 (at 24 x width)
#     SmolLM2-135M fp32 2 x 256 / 4 x 512 / 4 x 512 checkpointing: 1.02 / 3.54 / 0.83 GiB, estimated 1.53 / 4.16 / 1.16
ALLOCATOR_SLACK = 1.05


# --------------------------------------------------------------------------------------------------------------
# The model's shape, from transformers, on the meta device
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adaptable:
    """One module LoRA can adapt: an nn.Linear or transformers' Conv1D (GPT-2's, which stores its weight (in, out))."""

    name: str  # the leaf name (`q_proj`, `c_attn`): what --lora-targets and PEFT's target_modules name
    fan_in: int
    fan_out: int
    conv1d: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model, read from its config and its meta-device build."""

    model_type: str
    parameters: int  # num_parameters(): tied embeddings counted once
    vocab: int
    width: int  # hidden size
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inner: int  # MLP width
    tied: bool  # the output embedding is the input embedding
    modules: tuple[Adaptable, ...]  # every adaptable module but the output embedding

    @property
    def adaptable(self) -> list[str]:
        return sorted({module.name for module in self.modules})

    def adapter_parameters(self, targets: Sequence[str], r: int) -> int:
        """LoRA's trainable parameters: r x (in + out) for each adapted module (A is r x in, B is out x r)."""
        return sum(r * (module.fan_in + module.fan_out) for module in self.modules if module.name in targets)

    def target_inputs(self, targets: Sequence[str]) -> int:
        """The input widths of the adapted modules of one block, summed (LoRA keeps its own copy of each input)."""
        return sum(module.fan_in for module in self.modules if module.name in targets) // max(self.layers, 1)

    @property
    def block_matmul_parameters(self) -> int:
        """The weights of every block's matrix products, all blocks together (the output embedding apart)."""
        return sum(module.fan_in * module.fan_out for module in self.modules)


def adaptable_modules(model: Any) -> dict[str, Adaptable]:
    """The modules of `model` LoRA can adapt, by their full name: nn.Linear and transformers' Conv1D, without the
    output embedding (adapting it would change the tied input embedding too, and the merged model with it)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            found[name] = Adaptable(name.rsplit(".", 1)[-1], int(fan_in), int(fan_out), True)
        elif isinstance(module, nn.Linear):
            found[name] = Adaptable(name.rsplit(".", 1)[-1], module.in_features, module.out_features, False)
    return found


def as_transformers_config(model_config: Any) -> Any:
    """A transformers config from a config object or a config.json's content."""
    if isinstance(model_config, Mapping):
        from transformers import AutoConfig

        values = dict(model_config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    return model_config


def model_shape(model_config: Any) -> ModelShape:
    """The shape of the model a config describes, built on the meta device (no memory is allocated, nothing is
    initialised). The config is first checked to describe a size some machine holds (families.check_size), so an
    absurd config.json is refused in one line instead of building millions of modules.

    Raises:
        ModelError: an absurd or unusable size.
    """
    config = as_transformers_config(model_config)
    return _model_shape(config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=8)
def _model_shape(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .families import check_size

    values = json.loads(config_json)
    check_size(values, values.get("_name_or_path") or values.get("model_type", "model"))
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    width = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return ModelShape(
        model_type=config.model_type,
        parameters=int(model.num_parameters()),
        vocab=int(output.weight.shape[0]),
        width=width,
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or width // heads),
        inner=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width),
        tied=output.weight is embedding.weight,
        modules=tuple(adaptable_modules(model).values()),
    )


# --------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------


def optimizer_state(optim: str) -> tuple[str, float]:
    """The optimizer's name for people and its state in bytes per trainable parameter: AdamW keeps two fp32 moments
    (8 B); bitsandbytes' 8-bit AdamW two 8-bit ones (2 B, plus a few block scales); Lion one moment; SGD none
    (no momentum by default); Adafactor factored second moments (rows + columns: ~0 per parameter)."""
    name = optim.lower()
    eight_bit = "8bit" in name
    if "lion" in name:
        return ("8-bit Lion", 1.0) if eight_bit else ("Lion", 4.0)
    if name == "sgd":
        return "SGD", 0.0
    if name == "adafactor":
        return "Adafactor", 0.1
    if eight_bit:
        return "8-bit AdamW", 2.0
    return "AdamW", 8.0


def layer_activation_bytes(shape: ModelShape, precision: str, lora_inputs: int = 0) -> float:
    """What autograd keeps for the backward pass per token of one block, in bytes, under fp16/bf16 autocast with
    PyTorch's SDPA attention (the attention matrix is never stored) or in fp32.

    Measured on CPU (torch 2.13, transformers 5.24) by summing the distinct storages autograd saves in one forward
    (torch.autograd.graph.saved_tensors_hooks), 2- and 4-block models subtracted, bf16 autocast standing in for a
    T4's fp16 (both 2 bytes; matrix products in half precision, norms in fp32; the residual stream stays fp32):

    - GPT-2 (768 wide, 12 heads, MLP 3,072): 49,216 B = 10 x inner + 24 x width + 4 x heads + 16, exactly: GELU's
      tanh formula keeps four MLP-wide half-precision tensors and c_proj's input a fifth; the two layer norms keep
      their fp32 inputs; each matrix product its half-precision input. 96-256 wide (tests/test_memory.py) keep
      4 x width more (8,412 B at 96 wide): the formula takes 28 x width; in fp32 another 4 x width (measured).
    - Llama-style (576 wide, 9 heads of 64, 3 kv heads, MLP 1,536; also 720 wide, MLP 3,072, head_dim 128, 9 kv
      heads): 31,916 B = 8 x inner + 26 x width + 8 x heads x head_dim + 4 x heads + 8, exactly in all five (the
      key/value heads do not count: they are repeated to every head before attention, and the repeats are kept).
      Shapes 512 wide keep ~14 x width less on CPU (oneDNN keeps no half-precision copy of some matmul inputs);
      the formula keeps the larger figure, which is what CUDA's autocast keeps.
    - Qwen3's q/k norms add 6 x (heads + kv_heads) x head_dim + 4 x (heads + kv_heads) (9,264 B measured: 9,264).
    - LoRA adds ~4 B per element of each adapted module's input (its dropout and its half-precision copy):
      GPT-2 on c_attn,c_proj +18,528 B measured, 18,432 estimated; Llama on all seven projections +16,736
      measured, 19,968 estimated.

    On CUDA GPT-2's dropout masks are bool (CPU's are half precision): 2 x width less there, so a little to spare.
    In fp32 the half-precision tensors are fp32 (twice the bytes).
    """
    half = 2 if precision in ("fp16", "bf16") else 4
    d, inner, heads = shape.width, shape.inner, shape.heads
    if shape.model_type == "gpt2":
        kept = half * (5 * inner + 8 * d) + 4 * 3 * d + 4 * heads + 16 + (4 * d if half == 4 else 0)
    else:
        attention = heads * shape.head_dim
        kept = half * (4 * inner + 5 * d + 4 * attention) + 4 * 4 * d + 4 * heads + 8
        if shape.model_type == "qwen3":
            kept += 6 * (heads + shape.kv_heads) * shape.head_dim + 4 * (heads + shape.kv_heads)
    return kept + half * 2 * lora_inputs


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak GPU memory of a training step, in bytes, by what holds it."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_name: str
    tokens: int  # tokens a micro-batch

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def fits(self, memory_gib: float) -> bool:
        """Whether the run fits a GPU of `memory_gib` (what torch reports), less the CUDA context."""
        return self.total <= (memory_gib - CUDA_RESERVE_GIB) * GIB

    def describe(self) -> str:
        """`weights 0.5 + grads 0.5 + AdamW 1.0 + activations 2.1 = 4.1 GiB`"""
        parts = [("weights", self.weights), ("grads", self.gradients), (self.optimizer_name, self.optimizer)]
        parts.append(("activations", self.activations))
        return " + ".join(f"{name} {value / GIB:.1f}" for name, value in parts) + f" = {self.total_gib:.1f} GiB"


def estimate_memory(
    shape: ModelShape,
    *,
    tokens: int,
    row_width: int,
    method: str = "full",
    optim: str = "adamw_torch",
    precision: str = "fp16",
    gradient_checkpointing: bool = False,
    lora_r: int = 16,
    lora_targets: Sequence[str] = (),
    reference_model: bool = False,
) -> MemoryEstimate:
    """The peak memory of one training step (forward, backward, optimizer step) on one GPU.

    Args:
        shape: the model (model_shape).
        tokens: tokens a micro-batch (rows x width, padding included).
        row_width: the widest row: SDPA keeps each block's attention mask, row_width entries a token.
        method: "full" or "lora" (only the adapters train: their count from r and the target shapes).
        optim: the Trainer's optimizer name (optimizer_state).
        precision: "fp16"/"bf16" (autocast over fp32 weights, as the Trainer runs it) or "fp32".
        gradient_checkpointing: keep only each block's input, recompute the block in the backward pass.
        lora_r, lora_targets: the adapters' rank and the module names they go on.
        reference_model: a frozen fp32 copy of the weights beside the model (preference tuning, full method).

    Returns:
        Weights: fp32, 4 B a parameter (+ adapters; + the reference copy). Gradients and optimizer states: of
        the trainable parameters only (4 B + the optimizer's). Activations: layer_activation_bytes for every
        block (each block's fp32 input alone under checkpointing, plus one block recomputed), the blocks'
        attention masks and half-precision weight copies (autocast casts each weight once a forward and autograd
        keeps the copy; LoRA's frozen weights too), one block's worth of backward temporaries, and the chunked
        loss's working set: LOSS_CHUNK positions x vocab of fp32 logits (+ their half-precision gradient), a
        half-precision copy of the output embedding, the gradient of the last hidden states and, when the
        embedding trains, the fp32 gradient of it (loss.py).

        Gradients are counted in full beside the activations: with accumulation they are (the first micro-batch's
        stay while the next one runs); without, the backward pass frees activations as it makes gradients, so the
        estimate is high by up to the gradients there.
    """
    half = 2 if precision in ("fp16", "bf16") else 4
    d, layers, vocab = shape.width, shape.layers, shape.vocab
    lora = method == "lora"
    adapters = shape.adapter_parameters(lora_targets, lora_r) if lora else 0
    trainable = adapters if lora else shape.parameters
    name, state_bytes = optimizer_state(optim)

    weights = 4 * (shape.parameters + adapters) + (4 * shape.parameters if reference_model else 0)
    per_layer = layer_activation_bytes(shape, precision, shape.target_inputs(lora_targets) if lora else 0)
    mask = half * row_width
    copies = 2 * shape.block_matmul_parameters if half == 2 else 0
    # Outside the blocks: the embeddings' output and dropout, the final norm's input and output (measured 8.0-8.9 x
    # width), and the final hidden states the fp16 loss keeps for its backward pass (4 x width).
    outside = 13 * d
    if gradient_checkpointing:
        kept = tokens * (layers * 4 * d + outside) + tokens * (per_layer + mask) + copies // max(layers, 1)
    else:
        kept = tokens * (layers * (per_layer + mask) + outside) + copies
    backward = tokens * per_layer  # gradients of one block's activations, while its backward runs
    chunk = min(LOSS_CHUNK, tokens)
    embedding_trains = not lora
    loss = chunk * vocab * (4 + half if half == 2 else 4) + (vocab * d * 2 if half == 2 else 0) + tokens * d * 4
    loss += vocab * d * 4 if embedding_trains else 0
    return MemoryEstimate(
        weights=int(weights),
        gradients=int(4 * trainable),
        optimizer=int(state_bytes * trainable),
        activations=int((kept + backward + loss) * ALLOCATOR_SLACK),
        optimizer_name=name,
        tokens=int(tokens),
    )


# --------------------------------------------------------------------------------------------------------------
# A run's estimate, and what fits when it does not
# --------------------------------------------------------------------------------------------------------------


def micro_batch(config: RunConfig, max_length: int) -> tuple[int, int]:
    """(tokens, widest row) of a micro-batch, before the data is read.

    Padded (`--batching pad`, and preference pairs, chosen and rejected side by side): `batch_size` rows as wide as
    the window, the widest batch there can be. Packed (train's default): a batch is `batch_size` dialogues of the
    data's mean window length, which is not known yet: taken as a whole 512-token row each, 4x DailyDialog's mean
    (~121 GPT-2 tokens), so short chat data fits with room; conversations longer than that on average make larger
    batches than the estimate says.
    """
    if isinstance(config, PreferConfig):
        return 2 * config.batch_size * max_length, max_length
    if getattr(config, "batching", "pad") == "pack":
        return config.batch_size * min(max_length, ROW_TOKENS), max_length
    return config.batch_size * max_length, max_length


def estimate_run(
    config: RunConfig, shape: ModelShape, max_length: int, precision: str = "fp16", optim: str | None = None
) -> MemoryEstimate:
    """estimate_memory for a run's settings (`optim`: the optimizer as resolved, when `--optim auto`)."""
    tokens, row_width = micro_batch(config, max_length)
    targets = resolve_targets(config.lora_targets, shape.model_type, shape.adaptable) if config.method == "lora" else ()
    chosen = optim or ("adamw_torch" if config.optim == "auto" else config.optim)
    return estimate_memory(
        shape,
        tokens=tokens,
        row_width=row_width,
        method=config.method,
        optim=chosen,
        precision=precision,
        gradient_checkpointing=config.gradient_checkpointing,
        lora_r=config.lora_r,
        lora_targets=targets,
        reference_model=isinstance(config, PreferConfig) and config.method != "lora",
    )


def resolve_targets(lora_targets: str, model_type: str, available: Sequence[str]) -> tuple[str, ...]:
    """The module names of `--lora-targets` ("auto": the family's, families.FAMILIES), checked against the leaf
    names of the model's adaptable modules (`available`).

    Raises:
        ConfigError: empty, or a name the model does not have (the message lists those it has).
    """
    from .families import family_of

    available = sorted(available)
    if lora_targets.strip() == "auto":
        family = family_of(model_type)
        targets = [name for name in family.lora_targets if name in available] if family else []
        if not targets:
            raise ConfigError(
                f"--lora-targets auto: no default targets for model_type {model_type!r}; name one or more of "
                f"{', '.join(available)}"
            )
        return tuple(targets)
    targets = [name.strip() for name in lora_targets.split(",") if name.strip()]
    if not targets:
        raise ConfigError(f"--lora-targets: empty; name one or more of {', '.join(available)} (or auto)")
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ConfigError(
            f"--lora-targets {lora_targets}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear "
            f"module of this {model_type} model; choose from {', '.join(available)} (or auto)"
        )
    return tuple(dict.fromkeys(targets))


def smaller_batches(config: RunConfig) -> list[RunConfig]:
    """The same effective batch in smaller micro-batches: each divisor of the batch size below it, largest first,
    with the accumulation that keeps batch x accumulation."""
    size, steps = config.batch_size, config.gradient_accumulation_steps
    return [
        config.replace(batch_size=smaller, gradient_accumulation_steps=steps * size // smaller)
        for smaller in range(size - 1, 0, -1)
        if size % smaller == 0
    ]


def alternatives(config: RunConfig, eight_bit: bool) -> list[tuple[str, list[RunConfig]]]:
    """The settings that save memory, in the order to try them: a smaller batch with the same effective batch;
    gradient checkpointing; 8-bit AdamW; LoRA, each with those before it. By kind ("full": the method kept, "lora"),
    the candidates of the larger micro-batch first: a run that fits with checkpointing at its own batch is told
    that, not to take batch 1 with 16 accumulation steps (as fast as ever with checkpointing, much slower without).
    """
    levers: dict[str, list[dict[str, Any]]] = {"full": [{}], "lora": []}
    if not config.gradient_checkpointing:
        levers["full"].append({"gradient_checkpointing": True})
    if eight_bit and "8bit" not in config.optim:
        levers["full"].append({"gradient_checkpointing": True, "optim": EIGHT_BIT_OPTIM})
    if config.method != "lora":
        levers["lora"] = [{"method": "lora"}, {"method": "lora", "gradient_checkpointing": True}]
        if eight_bit and "8bit" not in config.optim:
            levers["lora"].append({"method": "lora", "gradient_checkpointing": True, "optim": EIGHT_BIT_OPTIM})
    batches = [config, *smaller_batches(config)]
    out = []
    for kind, changes in levers.items():
        candidates = [batch.replace(**change) if change else batch for batch in batches for change in changes]
        out.append((kind, [candidate for candidate in candidates if candidate != config]))
    return out


def changed_flags(before: RunConfig, after: RunConfig) -> str:
    names = ("method", "batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "optim")
    return " ".join(
        render_flag(name, getattr(after, name)) for name in names if getattr(after, name) != getattr(before, name)
    )


def what_fits(
    config: RunConfig, shape: ModelShape, max_length: int, memory_gib: float, precision: str, eight_bit: bool
) -> list[tuple[str, float]]:
    """The first settings that fit, re-estimated in the order of `alternatives`: the first that keeps the method,
    and the first with LoRA when that is another. Each: (flags, GiB)."""
    found: dict[str, tuple[str, float]] = {}
    for kind, candidates in alternatives(config, eight_bit):
        if kind in found:
            continue
        for candidate in candidates:
            try:
                estimate = estimate_run(candidate, shape, max_length, precision)
            except ConfigError:  # --lora-targets typed for a full run, not this model's: LoRA is no option then
                break
            if estimate.fits(memory_gib):
                found[kind] = (changed_flags(config, candidate), estimate.total_gib)
                break
    return list(found.values())


def memory_line(hardware: Any, estimate: MemoryEstimate) -> str:
    return (
        f"memory estimate on {hardware.name} ({hardware.memory_gb:.1f} GiB), {estimate.tokens:,} tokens a micro-batch: "
        f"{estimate.describe()}"
    )


def check_memory(
    config: RunConfig, model_config: Any, hardware: Any, precision: str, max_length: int, optim: str, eight_bit: bool
) -> str | None:
    """The memory estimate line for a run on a CUDA GPU (None elsewhere: CPU and MPS memory is the machine's).

    Raises:
        TrainingError: the run will not fit the GPU: one line with the estimate and the settings that fit.
    """
    if hardware.device != "cuda" or not hardware.memory_gb:
        return None
    shape = model_shape(model_config)
    estimate = estimate_run(config, shape, max_length, precision, optim)
    if estimate.fits(hardware.memory_gb):
        return memory_line(hardware, estimate)
    options = what_fits(config, shape, max_length, hardware.memory_gb, precision, eight_bit)
    needs = (
        f"{config.model}: {'LoRA' if config.method == 'lora' else 'full fine-tuning'} with {estimate.optimizer_name}"
        f" at --batch-size {config.batch_size} needs ~{estimate.total_gib:.1f} GiB ({estimate.describe()}), the "
        f"{hardware.name} has {hardware.memory_gb:.1f} GiB"
    )
    if not options:
        raise TrainingError(
            f"{needs}: nothing gpt2ft can switch fits (LoRA keeps the frozen fp32 weights: "
            f"{4 * shape.parameters / GIB:.1f} GiB); use a smaller model or a larger GPU"
        )
    (flags, gib), *rest = options
    fits = f"{flags} (~{gib:.1f} GiB) fits" + "".join(f"; so does {more} (~{size:.1f} GiB)" for more, size in rest)
    raise TrainingError(f"{needs}: {fits}")
