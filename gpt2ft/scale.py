"""Growing past GPT-2 small: T4 presets for the larger sizes, LoRA adapters, and optimizer checks.

    python -m gpt2ft train --model gpt2-xl                        # on a 15 GB T4: LoRA + 8-bit AdamW + checkpointing
    python -m gpt2ft train --model gpt2-large --no-t4-presets     # exactly the flags given, nothing switched
    python -m gpt2ft train --method lora --lora-r 8 --lora-targets c_attn,c_proj,c_fc
    python -m gpt2ft train --optim adamw_bnb_8bit                 # bitsandbytes' 8-bit AdamW (also steps on CPU)

`train()` calls the four functions here in order: `choose_presets` (before anything is loaded), `check_optimizer`
(fails fast, in one line, on an optimizer that cannot run), `apply_method` (wraps the model in PEFT LoRA adapters)
and `merge_for_saving` (folds the adapters back in, so the saved model is a plain GPT-2 that loads without PEFT).
The libraries do the work: PEFT for LoRA, bitsandbytes (through the Trainer's `optim`) for 8-bit optimizer states,
the Trainer for gradient checkpointing, mixed precision and data parallelism.
"""

from __future__ import annotations

import importlib.util
import json
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
from transformers.pytorch_utils import Conv1D
from transformers.training_args import OptimizerNames

from .config import ConfigError, RunConfig, render_flag
from .modeling import GPT2_SIZES, Hardware

# peft is imported inside the functions that use LoRA, after quiet_bitsandbytes(): importing PEFT imports
# bitsandbytes when it is installed, and a full fine-tune needs neither.

logger = logging.getLogger(__name__)

# Hub ids are also published under this organisation; `openai-community/gpt2-xl` is the same model as `gpt2-xl`.
HUB_PREFIX = "openai-community/"
EIGHT_BIT_OPTIM = "adamw_bnb_8bit"
# LoRA's few parameters need a larger step than full fine-tuning: ~1e-4..3e-4 is the usual range (LoRA paper, PEFT
# examples), where 5e-5 (full fine-tuning's rate) learns several times slower.
LORA_LEARNING_RATE = 2e-4
# bitsandbytes keeps 8-bit states only for tensors of at least this many elements (its `min_8bit_size`); the probe
# uses one so it exercises the 8-bit kernels, not the 32-bit fallback.
BNB_PROBE_SIZE = 4096


# --------------------------------------------------------------------------------------------------------------
# T4 presets
# --------------------------------------------------------------------------------------------------------------


def gpt2_parameter_count(n_embd: int, n_layer: int, vocab_size: int = 50257, n_positions: int = 1024) -> int:
    """Exact parameter count of a GPT-2 (tied embeddings): per block 12*d^2 + 13*d, plus the two embeddings and the
    final layer norm. Checked against transformers' GPT2LMHeadModel for all four released sizes."""
    return n_layer * (12 * n_embd * n_embd + 13 * n_embd) + vocab_size * n_embd + n_positions * n_embd + 2 * n_embd


def model_size(model: str) -> tuple[str, float] | None:
    """Which released GPT-2 size `model` is (or is as large as): ("gpt2-xl", 1.56e9), or None when unknown.

    A Hub id is matched by name (with or without `openai-community/`); a local folder by its config.json, so a
    fine-tuned gpt2-large saved locally counts as large.
    """
    name = model[len(HUB_PREFIX) :] if model.startswith(HUB_PREFIX) else model
    if name in GPT2_SIZES:
        return name, GPT2_SIZES[name]
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        params = gpt2_parameter_count(
            int(config["n_embd"]),
            int(config["n_layer"]),
            int(config.get("vocab_size", 50257)),
            int(config.get("n_positions", 1024)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a GPT-2 config; load_model reports that with a proper message
    # Bucket by size half-way (geometrically) between the released sizes.
    for size, limit in (("gpt2", 2.1e8), ("gpt2-medium", 5.2e8), ("gpt2-large", 1.1e9)):
        if params < limit:
            return size, float(params)
    return "gpt2-xl", float(params)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def preset_changes(size: str, eight_bit: bool) -> tuple[dict[str, Any], str]:
    """The settings that make `size` fit a 15 GB T4 in fp16, and why (see README "What fits on a 15 GB T4";
    GiB = 2**30 bytes, the unit torch reports: a T4 shows 15 GiB, ~14.7 GiB usable).

    Bytes per parameter under the Trainer's fp16 mixed precision: fp32 weights 4 + fp32 grads 4 + AdamW's two fp32
    moments 8 = 16 for full fine-tuning; 10 with bitsandbytes' 8-bit moments; 4 for frozen LoRA base weights.
    Gradient checkpointing keeps only each block's input for the backward pass, so activations become negligible;
    smaller micro-batches with accumulation keep the effective batch (16 dialogues) and cap the logits
    (tokens x 50,257 vocabulary), the largest tensor left.
    """
    if size == "gpt2-medium":
        return (
            {"gradient_checkpointing": True, "batch_size": 8, "gradient_accumulation_steps": 2, "eval_batch_size": 16},
            "gpt2-medium (355M): full fine-tuning's weights, grads and AdamW states fit (16 bytes/param = 5.3 GiB), "
            "but a batch of 16 long dialogues adds ~8 GiB of activations and logits; gradient checkpointing and batch "
            "8 x 2 accumulation (the same effective batch of 16) keep that under 1 GiB",
        )
    if size == "gpt2-large":
        if eight_bit:
            return (
                {
                    "optim": EIGHT_BIT_OPTIM,
                    "gradient_checkpointing": True,
                    "batch_size": 4,
                    "gradient_accumulation_steps": 4,
                    "eval_batch_size": 8,
                },
                "gpt2-large (774M): with fp32 AdamW the weights, grads and states alone take 16 bytes/param = 11.5 GiB "
                "of the ~14.7 GiB usable; 8-bit AdamW (10 bytes/param = 7.2 GiB), gradient checkpointing and batch "
                "4 x 4 accumulation need ~8 GiB in all",
            )
        return (
            {
                "method": "lora",
                "learning_rate": LORA_LEARNING_RATE,
                "gradient_checkpointing": True,
                "batch_size": 4,
                "gradient_accumulation_steps": 4,
                "eval_batch_size": 8,
            },
            "gpt2-large (774M): fp32 AdamW takes 16 bytes/param = 11.5 GiB and bitsandbytes (8-bit AdamW) is not "
            "installed, so LoRA adapters (frozen fp32 base = 2.9 GiB), gradient checkpointing and batch 4 x 4",
        )
    if size == "gpt2-xl":
        changes = {
            "method": "lora",
            "learning_rate": LORA_LEARNING_RATE,
            "gradient_checkpointing": True,
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "eval_batch_size": 8,
        }
        if eight_bit:
            changes["optim"] = EIGHT_BIT_OPTIM
        return (
            changes,
            "gpt2-xl (1.56B): even 8-bit AdamW needs 10 bytes/param = 14.5 GiB; LoRA adapters train ~1% of the "
            "weights on a frozen fp32 base (4 bytes/param = 5.8 GiB)"
            + (", with 8-bit AdamW" if eight_bit else "")
            + ", gradient checkpointing and batch 4 x 4 accumulation",
        )
    return {}, ""


def choose_presets(
    config: RunConfig, hardware: Hardware, explicit: set[str], leave: Sequence[str] = ()
) -> tuple[RunConfig, list[str]]:
    """On a ~15 GB GPU (a Colab T4), switch GPT-2 medium/large/xl to settings that fit; return the notes saying what
    changed and why.

    Only settings the user did not set are changed: `explicit` names those they typed (the CLI knows; a value typed
    equal to the default counts as typed). `--no-t4-presets` turns all of this off. GPT-2 small, CPU/MPS, GPUs of
    20 GB or more and unknown models are left alone, with no notes. `leave` names settings a stage keeps whatever
    the presets say (preference tuning keeps its own learning rate: LoRA's 2e-4 suits fine-tuning, not DPO).
    """
    if not config.t4_presets or hardware.device != "cuda" or not hardware.is_t4_sized:
        return config, []
    found = model_size(config.model)
    if found is None or found[0] == "gpt2":
        return config, []
    size, _ = found
    changes, reason = preset_changes(size, bitsandbytes_installed())
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
    if not applied:
        return config, [
            f"t4 presets: {size} on {hardware.name}: your settings kept ({', '.join(kept)})"
        ] if kept else []
    notes = [
        f"t4 presets for {size} on {hardware.name} ({hardware.memory_gb:.1f} GiB): "
        + " ".join(render_flag(name, value) for name, value in applied.items()),
        f"why: {reason}" + (f"; kept your {', '.join(kept)}" if kept else "") + " (turn off with --no-t4-presets)",
    ]
    return config.replace(**applied), notes


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
    """The module names in `--lora-targets`, checked against the model's Conv1D modules (GPT-2's c_attn: attention
    qkv; c_proj: the attention *and* the MLP output projections; c_fc: the MLP input).

    Raises:
        ConfigError: empty, or a name the model does not have.
    """
    targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()]
    available = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, Conv1D)}
    )
    if not targets:
        raise ConfigError(f"--lora-targets: empty; name one or more of {', '.join(available)}")
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ConfigError(
            f"--lora-targets {config.lora_targets}: {', '.join(unknown)} is not a Conv1D module of this GPT-2; "
            f"choose from {', '.join(available)}"
        )
    return targets


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
    """PEFT's LoraConfig for `--lora-r/-alpha/-dropout/-targets` on this GPT-2 (train and prefer use the same one).

    Raises:
        ConfigError: bad `--lora-targets`.
    """
    quiet_bitsandbytes()  # PEFT imports bitsandbytes when it is installed
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_targets(config, model),
        # GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear. PEFT would notice and flip it
        # per layer with a warning, but the saved adapter_config.json would still say False.
        fan_in_fan_out=True,
    )


def describe_method(config: RunConfig) -> str:
    """`full fine-tuning`, or `LoRA r=16 alpha=32 on c_attn, c_proj`."""
    if config.method != "lora":
        return "full fine-tuning"
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
    GPT2LMHeadModel: it loads with AutoModelForCausalLM, without PEFT, and gives the same logits as base + adapter.
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
