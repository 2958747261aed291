"""Growing past GPT-2 small: T4 presets by parameter count, LoRA adapters per architecture, and optimizer checks.

    python -m gpt2ft train --model gpt2-xl                        # on a 15 GB T4: LoRA + 8-bit AdamW + checkpointing
    python -m gpt2ft train --model ./Llama-3.2-1B-Instruct        # 1.2B parameters: the same, by parameter count
    python -m gpt2ft train --model gpt2-large --no-t4-presets     # exactly the flags given, nothing switched
    python -m gpt2ft train --method lora --lora-r 8 --lora-targets c_attn,c_proj,c_fc
    python -m gpt2ft train --optim adamw_bnb_8bit                 # bitsandbytes' 8-bit AdamW (also steps on CPU)

runs.plan_stage calls `choose_presets` and `settle_lora_targets` (from the model's config, before any weight
loads), then `check_optimizer` (fails fast, in one line, on an optimizer that cannot run) and memory.check_memory;
a stage then calls `apply_method` (wraps the model in PEFT LoRA adapters on the family's projections) and
`merge_for_saving` (folds the adapters back in, so the saved model is a plain transformers model that loads without
PEFT).
The libraries do the work: PEFT for LoRA, bitsandbytes (through the Trainer's `optim`) for 8-bit optimizer states,
the Trainer for gradient checkpointing, mixed precision and data parallelism.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.training_args import OptimizerNames

from .config import ConfigError, RunConfig, render_flag
from .memory import EIGHT_BIT_OPTIM, adaptable_modules, as_transformers_config, model_shape, resolve_targets
from .modeling import Hardware

# peft is imported inside the functions that use LoRA, after quiet_bitsandbytes(): importing PEFT imports
# bitsandbytes when it is installed, and a full fine-tune needs neither.

logger = logging.getLogger(__name__)

# LoRA's few parameters need a larger step than full fine-tuning: ~1e-4..3e-4 is the usual range (LoRA paper, PEFT
# examples), where 5e-5 (full fine-tuning's rate) learns several times slower.
LORA_LEARNING_RATE = 2e-4
# bitsandbytes keeps 8-bit states only for tensors of at least this many elements (its `min_8bit_size`); the probe
# uses one so it exercises the 8-bit kernels, not the 32-bit fallback.
BNB_PROBE_SIZE = 4096


# --------------------------------------------------------------------------------------------------------------
# T4 presets
# --------------------------------------------------------------------------------------------------------------


# The presets by parameter count: the bounds lie half-way (geometrically) between the released GPT-2 sizes (124M,
# 355M, 774M, 1.56B), so each of those gets the settings made for it, and any family of a like size the same
# (Qwen2.5-0.5B the 355M ones, Qwen3-0.6B the 774M ones, Llama 3.2 1B and SmolLM2-1.7B the 1.56B ones).
PRESET_TIERS = (2.1e8, 5.2e8, 1.1e9)


def size_tier(parameters: int) -> int:
    """0 (up to ~210M parameters: no presets), 1 (~355M), 2 (~774M) or 3 (~1.5B and more)."""
    return sum(parameters >= bound for bound in PRESET_TIERS)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def preset_changes(tier: int, eight_bit: bool) -> dict[str, Any]:
    """The settings that fit a model of `tier` on a 15 GB T4 in fp16 (README "What fits on a 15 GB T4").

    Bytes per parameter under the Trainer's fp16 mixed precision: fp32 weights 4 + fp32 grads 4 + AdamW's two fp32
    moments 8 = 16 for full fine-tuning; 10 with bitsandbytes' 8-bit moments; 4 for frozen LoRA base weights.
    Gradient checkpointing keeps only each block's input for the backward pass; smaller micro-batches with
    accumulation keep the effective batch (16 dialogues). memory.estimate_memory has the figures.

    - 1 (~355M): full fine-tuning fits (16 B/param = 5.3 GiB), a batch of 16 dialogues' activations does not:
      checkpointing and batch 8 x 2.
    - 2 (~774M): fp32 AdamW's 11.5 GiB leaves too little; 8-bit AdamW (7.2 GiB), checkpointing and batch 4 x 4, or,
      without bitsandbytes, LoRA.
    - 3 (~1.5B): even 8-bit AdamW needs 10 B/param = 14.5 GiB; LoRA on a frozen fp32 base (4 B/param = 5.8 GiB),
      with 8-bit AdamW when installed, checkpointing and batch 4 x 4.
    """
    if tier <= 0:
        return {}
    if tier == 1:
        return {
            "gradient_checkpointing": True,
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "eval_batch_size": 16,
        }
    changes: dict[str, Any] = {}
    if tier >= 3 or not eight_bit:
        changes.update(method="lora", learning_rate=LORA_LEARNING_RATE)
    if eight_bit:
        changes["optim"] = EIGHT_BIT_OPTIM
    changes.update(gradient_checkpointing=True, batch_size=4, gradient_accumulation_steps=4, eval_batch_size=8)
    return changes


def settle_presets(
    config: RunConfig, changes: dict[str, Any], explicit: set[str], leave: Sequence[str]
) -> tuple[RunConfig, dict[str, Any], list[str]]:
    """`config` with the preset `changes` the user left to gpt2ft; (settled, applied, the user's settings kept)."""
    changes = {name: value for name, value in changes.items() if name not in leave}
    applied = {
        name: value for name, value in changes.items() if name not in explicit and getattr(config, name) != value
    }
    kept = [
        render_flag(name, getattr(config, name))
        for name, value in changes.items()
        if name in explicit and getattr(config, name) != value
    ]
    # Batch size and accumulation go together (their product is the effective batch): change both or neither.
    if ("batch_size" in applied) != ("gradient_accumulation_steps" in applied):
        applied.pop("batch_size", None)
        applied.pop("gradient_accumulation_steps", None)
    return (config.replace(**applied) if applied else config), applied, kept


def choose_presets(
    config: RunConfig,
    hardware: Hardware,
    explicit: set[str],
    leave: Sequence[str] = (),
    model_config: Any = None,
    max_length: int | None = None,
) -> tuple[RunConfig, list[str]]:
    """On a ~15 GB GPU (a Colab T4), switch a model of 355M parameters or more, of any family, to settings that fit;
    return the notes saying what changed and why.

    The settings come by the parameter count of the model's config (size_tier, preset_changes); where the memory
    estimate (memory.estimate_run) says they still do not fit (a large vocabulary, a long window, settings the
    user typed), those of the next tier up are taken, and so on. A model up to ~210M parameters whose settings fit
    is left alone. Only settings the user did not set are changed: `explicit` names those they typed (the CLI
    knows; a value typed equal to the default counts as typed). `--no-t4-presets` turns all of this off. CPU/MPS
    and GPUs of 20 GB or more are left alone, with no notes. `leave` names settings a stage keeps whatever the
    presets say (preference tuning keeps its own learning rate: LoRA's 2e-4 suits fine-tuning, not DPO).

    Args:
        model_config: the model's transformers config (or config.json's content); None: loaded here.
        max_length: the training window; None: the config's (modeling.training_window) or --max-length.
    """
    if not config.t4_presets or hardware.device != "cuda" or not hardware.is_t4_sized:
        return config, []
    from .memory import estimate_run, model_shape
    from .modeling import load_model_config, training_window

    model_config = load_model_config(config.model) if model_config is None else model_config
    shape = model_shape(model_config)
    window = max_length or config.max_length or training_window(as_transformers_config(model_config))
    eight_bit = bitsandbytes_installed()

    def fits(candidate: RunConfig) -> bool:
        try:
            return estimate_run(candidate, shape, window).fits(hardware.memory_gb)
        except ConfigError:
            return True  # bad --lora-targets: apply_method says so, in one line

    tier = size_tier(shape.parameters)
    settled, applied, kept = settle_presets(config, preset_changes(tier, eight_bit), explicit, leave)
    while tier < len(PRESET_TIERS) and not fits(settled):
        tier += 1
        settled, applied, kept = settle_presets(config, preset_changes(tier, eight_bit), explicit, leave)
    size = f"{config.model} ({shape.parameters / 1e6:,.0f}M parameters)"
    if not applied:
        return config, [
            f"t4 presets: {size} on {hardware.name}: your settings kept ({', '.join(kept)})"
        ] if kept else []
    before, after = estimate_run(config, shape, window), estimate_run(settled, shape, window)
    reason = (
        f"as set, the memory estimate is {before.describe()}, "
        f"{'within' if before.fits(hardware.memory_gb) else 'beyond'} the {hardware.memory_gb:.1f} GiB; with these, "
        f"{after.total_gib:.1f} GiB"
    )
    notes = [
        f"t4 presets for {size} on {hardware.name} ({hardware.memory_gb:.1f} GiB): "
        + " ".join(render_flag(name, value) for name, value in applied.items()),
        f"why: {reason}" + (f"; kept your {', '.join(kept)}" if kept else "") + " (turn off with --no-t4-presets)",
    ]
    return settled, notes


# --------------------------------------------------------------------------------------------------------------
# Optimizer check
# --------------------------------------------------------------------------------------------------------------


def quiet_bitsandbytes() -> None:
    # bitsandbytes warns on import, on CPUs with AVX512-BF16, that its optional 4-bit CPU kernel package is missing;
    # gpt2ft never uses 4-bit kernels, so the warning is only noise on every run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def probe_optimizer(optimizer_cls: Any, optimizer_kwargs: dict[str, Any], device: str) -> None:
    """One step of the optimizer the Trainer would build, on a small tensor on `device`; raises what it raises."""
    kwargs = {**optimizer_kwargs, "lr": 1e-3}
    param = torch.nn.Parameter(torch.ones(BNB_PROBE_SIZE, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU, falling back": still runs
        optimizer = optimizer_cls([param], **kwargs)
        param.grad = torch.ones_like(param)
        optimizer.step()
    if not bool(torch.isfinite(param).all()) or bool((param == 1).all()):
        raise RuntimeError("the probe step left the weights unchanged or not finite")


def check_optimizer(optim: str, build_args: Callable[[], Any], hardware: Hardware) -> Any:
    """Build the run's TrainingArguments and fail fast, in one line, when its optimizer cannot run on this machine.

    The Trainer itself says which optimizer a name means and what it needs (`Trainer.get_optimizer_cls_and_kwargs`):
    an unknown name or a missing package is refused here instead of at the first step. A bitsandbytes optimizer is
    also stepped once on this device (bitsandbytes 0.50's 8-bit AdamW does step on CPU tensors, so it is allowed).

    Returns:
        The TrainingArguments.

    Raises:
        ConfigError: a message starting with "--optim NAME:".
    """
    try:
        OptimizerNames(optim)
    except ValueError:
        names = ", ".join(str(name.value) for name in OptimizerNames)
        raise ConfigError(f"--optim {optim}: not an optimizer the Trainer knows; use auto or one of: {names}") from None
    args = build_args()
    quiet_bitsandbytes()
    try:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except ImportError as error:
        raise ConfigError(f"--optim {optim}: {str(error).strip().splitlines()[0]}; or use --optim auto") from None
    except ValueError as error:
        if "model" in str(error):
            return args  # optimizers built around the model (GaLore, LOMO, ...) are checked when training starts
        raise ConfigError(f"--optim {optim}: {str(error).strip().splitlines()[0]}") from None
    if getattr(optimizer_cls, "__module__", "").startswith("bitsandbytes"):
        device = hardware.device if hardware.device in ("cuda", "mps") else "cpu"
        if device == "cuda":
            # Under torchrun each process owns GPU LOCAL_RANK; probing on the default device would open a CUDA
            # context (~0.5 GB) on GPU 0 from every process.
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        try:
            probe_optimizer(optimizer_cls, optimizer_kwargs, device)
        except Exception as error:  # any failure here would stop the run at its first step
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"--optim {optim}: bitsandbytes cannot run it on {hardware.name} ({type(error).__name__}: {first}); "
                "use --optim auto"
            ) from None
    return args


# --------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------


def lora_targets(config: RunConfig, model: Any) -> list[str]:
    """The module names `--lora-targets` means for this model: "auto" = its family's (families.FAMILIES: GPT-2's
    c_attn and c_proj, the Llama-style blocks' q/k/v/o and gate/up/down projections); explicit names are checked
    against the model's adaptable modules (memory.adaptable_modules: nn.Linear and Conv1D leaf names).

    Raises:
        ConfigError: empty, "auto" for a model without default targets, or a name the model does not have.
    """
    names = {module.name for module in adaptable_modules(model).values()}
    return list(resolve_targets(config.lora_targets, model.config.model_type, names))


def settle_lora_targets(config: RunConfig, model_config: Any) -> RunConfig:
    """For a LoRA run, `--lora-targets` resolved ("auto" -> the family's) and checked against the model's modules,
    from its config alone (built on the meta device): a bad name is one line before the data or weights load, and
    the run's records, its model card and `describe_method` name the modules adapted.

    Raises:
        ConfigError: as lora_targets.
    """
    if config.method != "lora":
        return config
    shape = model_shape(model_config)
    targets = ",".join(resolve_targets(config.lora_targets, shape.model_type, shape.adaptable))
    return config.replace(lora_targets=targets) if targets != config.lora_targets else config


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable and total parameters (tied weights counted once)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's own count
        trainable, total = model.get_nb_trainable_parameters()
        return {"trainable_parameters": int(trainable), "total_parameters": int(total)}
    params = list(model.parameters())
    return {
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params),
    }


def build_lora_config(config: RunConfig, model: Any) -> Any:
    """PEFT's LoraConfig for `--lora-r/-alpha/-dropout/-targets` on this model (train and prefer use the same one).

    Raises:
        ConfigError: bad `--lora-targets`, or targets mixing Conv1D and nn.Linear modules.
    """
    quiet_bitsandbytes()  # PEFT imports bitsandbytes when it is installed
    from peft import LoraConfig, TaskType

    targets = lora_targets(config, model)
    kinds = {module.conv1d for module in adaptable_modules(model).values() if module.name in targets}
    if len(kinds) > 1:
        raise ConfigError(
            f"--lora-targets {config.lora_targets}: mixes Conv1D and nn.Linear modules; PEFT takes one weight "
            "layout a config: adapt one kind at a time"
        )
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        # transformers' Conv1D (GPT-2's) stores weights as (in, out), the transpose of nn.Linear. PEFT would notice
        # and flip it per layer with a warning, but the saved adapter_config.json would still say False.
        fan_in_fan_out=kinds == {True},
    )


def describe_method(config: RunConfig, model: Any = None) -> str:
    """`full fine-tuning`, or `LoRA r=16 alpha=32 on q_proj, k_proj, ...` (the targets as resolved: runs.plan_stage
    resolves "auto"; given the model, it is resolved here too)."""
    if config.method != "lora":
        return "full fine-tuning"
    if model is not None:
        targets = lora_targets(config, model)
    else:
        targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
    return f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {', '.join(targets)}"


def report_parameter_counts(counts: dict[str, int], describe: str) -> None:
    """Print the trainable vs total parameter counts (stderr: stdout carries the run's one JSON line of metrics)."""
    share = counts["trainable_parameters"] / max(counts["total_parameters"], 1)
    logger.info(
        f"{describe}: {counts['trainable_parameters']:,} trainable of {counts['total_parameters']:,} "
        f"parameters ({share:.2%})"
    )


def apply_method(model: Any, config: RunConfig, report: bool = True) -> tuple[Any, dict[str, int]]:
    """`full`: the model as it is. `lora`: the model wrapped by PEFT with LoRA adapters on `--lora-targets`, the
    base weights frozen. Prints (on the main process) and returns the trainable vs total parameter counts.

    Raises:
        ConfigError: bad `--lora-targets`.
    """
    if config.method == "lora":
        from peft import get_peft_model

        lora_config = build_lora_config(config, model)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # PEFT still asks for the deprecated is_gradient_checkpointing
            model = get_peft_model(model, lora_config)
        # Gradient checkpointing + LoRA: with reentrant checkpointing no gradient would reach the adapters, because
        # the checkpointed blocks' input (the frozen embeddings' output) does not require grad. No extra hook is
        # needed here: transformers' activation_checkpointing_enable, which the Trainer calls through the PEFT
        # wrapper, runs enable_input_require_grads itself (tests/test_scale.py checks the adapters get gradients).
    counts = parameter_counts(model)
    if report:
        report_parameter_counts(counts, describe_method(config))
    return model, counts


class SavedAdapter:
    """A LoRA adapter written by PEFT's own `save_pretrained` (adapter_config.json, adapter_model.safetensors,
    README.md) into a temporary folder *before* the model is merged, and copied to its final place later by
    `save_final_model`. Load it with `PeftModel.from_pretrained(base_model, folder)`."""

    def __init__(self, peft_model: Any) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="gpt2ft-adapter-")
        peft_model.save_pretrained(self._folder.name)

    def save_pretrained(self, folder: str | Path) -> None:
        shutil.copytree(self._folder.name, folder, dirs_exist_ok=True)

    def cleanup(self) -> None:
        self._folder.cleanup()


def merge_for_saving(model: Any, config: RunConfig) -> tuple[Any, SavedAdapter | None]:
    """The model to save and, for LoRA, the adapter to save beside it (under `adapter/`).

    `full`: (model, None). `lora`: PEFT saves the adapter first (a few MB, to a temporary folder), then its
    `merge_and_unload` folds W + (alpha/r)·BA into each adapted weight *in place* and returns a plain
    transformers model (GPT2LMHeadModel, LlamaForCausalLM, ...): it loads with AutoModelForCausalLM, without PEFT,
    and gives the same logits as base + adapter.
    Merging in place instead of on a copy keeps one copy of the weights in memory: a copy of GPT-2 XL is another
    5.8 GiB, which a T4 at the end of training (or Colab's 12.7 GB of RAM) may not have. `model` must not be used as
    a PEFT model afterwards.
    """
    if config.method != "lora":
        return model, None
    from peft import PeftModel

    peft_model = model.module if isinstance(getattr(model, "module", None), PeftModel) else model
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"method lora, but the model is a {type(peft_model).__name__}, not a PEFT model")
    adapter = SavedAdapter(peft_model)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, adapter
