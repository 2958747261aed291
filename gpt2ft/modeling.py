"""Load a causal LM and its tokenizer safely, and choose the numeric precision for the hardware.

Weights are loaded from safetensors only (never a pickle), with no remote code. `--model` is a Hub id (`gpt2`,
`HuggingFaceTB/SmolLM2-135M-Instruct`, ...) or a local `save_pretrained` folder holding weights and tokenizer, of a
family gpt2ft supports (families.py: GPT-2, Llama, Qwen2/Qwen3, Mistral).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .chat_format import check_template, ensure_chat_template
from .config import GPT2_CONTEXT
from .errors import ModelError
from .families import check_architecture, check_model_source, check_size

# The autocast dtype of each precision: the one map training, evaluation and the benchmark use.
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
# DailyDialog's longest dialogue is ~900 GPT-2 tokens (~1,100 in ChatML): 2,048 keeps every dialogue whole.
TRAINING_WINDOW = 2048


def load_tokenizer(name: str) -> Any:
    """The model's fast tokenizer, with pad = EOS when it has no pad token (GPT-2; labels, not ids, mark padding
    here) and a chat template: its own, or gpt2ft's (chat_format.CHAT_TEMPLATE) when it has none.

    Raises:
        ModelError: not loadable, no EOS token, or a chat template that fails or takes too long on a short
            conversation (chat_format.check_template).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as error:
        raise ModelError(
            f"--model {name}: cannot load the tokenizer ({type(error).__name__}: {first_line(error)})"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"--model {name}: the tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    check_template(tokenizer)  # a template that fails or never ends is refused now, in one line
    return tokenizer


def load_model(name: str, dtype: torch.dtype | None = None) -> Any:
    """A causal LM from safetensors, with PyTorch's SDPA attention (fused kernels; with gpt2ft's 4-D block masks
    and restarting positions, packed sequences stay apart in every family).

    Raises:
        ModelError: not loadable, not a supported family, or pickle-only weights.
    """
    check_model_source(name)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise for a small model's few hundred tensors
    # transformers prints a table of every missing, unexpected or misshapen tensor before it fails (or, for a missing
    # one, goes on with random weights): gpt2ft reads the same facts from the loading info and says them in one line.
    report = hf_logging.get_logger("transformers.modeling_utils")
    report.addFilter(drop_load_report)  # a filter, not a level: the logger's level changes what it checks
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name,
            use_safetensors=True,
            attn_implementation="sdpa",
            dtype=dtype or torch.float32,
            ignore_mismatched_sizes=True,  # reported below, naming the tensor, instead of raised after the table
            output_loading_info=True,
        )
    except Exception as error:
        raise ModelError(
            f"--model {name}: cannot load the model ({type(error).__name__}: {first_line(error)})"
        ) from None
    finally:
        report.removeFilter(drop_load_report)
        if bar_was_on:
            hf_logging.enable_progress_bar()
    check_loading_info(info, name)
    check_architecture(model.config.to_dict(), name)
    return model


def drop_load_report(record: logging.LogRecord) -> bool:
    """False for transformers' load report (a table of tensors), which check_loading_info says in one line."""
    return "LOAD REPORT" not in str(record.msg)


def check_loading_info(info: dict[str, Any], name: str) -> None:
    """Refuse weights that do not fit the model's config: a tensor of another shape, or one the config expects and the
    weights lack (transformers would fill it with random values). Tensors the config does not use are ignored, as
    transformers ignores them.

    Raises:
        ModelError: naming the first such tensor and how many there are.
    """
    mismatched = sorted(info.get("mismatched_keys") or ())
    missing = sorted(info.get("missing_keys") or ())
    if mismatched:
        key, saved, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelError(
            f"--model {name}: the weights do not fit config.json: {key} has shape {tuple(saved)} in the weights "
            f"and {tuple(expected)} in the config{more}"
        )
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"--model {name}: the weights lack tensors config.json needs: {missing[0]}{more}")


def load_model_and_tokenizer(name: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    check_model_source(name)
    tokenizer = load_tokenizer(name)
    model = load_model(name, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model_config(name: str) -> Any:
    """The model's config alone (no weights), to check it before anything slow happens: a supported family, of a
    size some machine can hold.

    Raises:
        ModelError: not loadable, not a supported family, or an absurd size.
    """
    check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:
        raise ModelError(
            f"--model {name}: cannot load the model config ({type(error).__name__}: {first_line(error)})"
        ) from None
    check_architecture(config.to_dict(), name)
    check_size(config.to_dict(), name)
    return config


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def config_context(config: Any) -> int:
    """The context length (tokens) of a model config: GPT-2's `n_positions` (1024 for every released size), the
    others' `max_position_embeddings` (8,192 for SmolLM2, 131,072 for Llama 3.2)."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return GPT2_CONTEXT


def training_window(config: Any) -> int:
    """The longest sequence a run trains on by default: the model's context, capped at TRAINING_WINDOW (a long-context
    model would otherwise plan rows for 131k-token sequences no dialogue has; longer dialogues are windowed)."""
    return min(config_context(config), TRAINING_WINDOW)


def model_context(model: Any) -> int:
    return config_context(model.config)


@dataclass
class Hardware:
    """The device training runs on and what it can do."""

    device: str
    name: str
    capability: tuple[int, int] | None
    memory_gb: float | None

    @property
    def is_t4_sized(self) -> bool:
        return self.memory_gb is not None and self.memory_gb < 20


def cuda_hardware(device: torch.device | str | int = 0) -> Hardware:
    props = torch.cuda.get_device_properties(device)
    return Hardware("cuda", props.name, (props.major, props.minor), props.total_memory / 2**30)


def detect_hardware() -> Hardware:
    if torch.cuda.is_available():
        return cuda_hardware(0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Hardware("mps", "Apple MPS", None, None)
    return Hardware("cpu", "CPU", None, None)


def choose_precision(requested: str, hardware: Hardware) -> tuple[str, str]:
    """Pick fp16, bf16 or fp32, with the reason.

    `torch.cuda.is_bf16_supported()` is True on a T4 (compute capability 7.5) because it counts emulation, which
    is many times slower than fp16, so the choice is gated on the capability instead: bf16 from 8.0 (Ampere) on,
    fp16 below, fp32 without CUDA.

    Returns:
        (precision, reason)
    """
    if requested != "auto":
        if requested in ("fp16", "bf16") and hardware.device != "cuda":
            raise ModelError(f"--precision {requested}: needs a CUDA GPU; this machine has {hardware.name}")
        if requested == "bf16" and hardware.capability and hardware.capability < (8, 0):
            raise ModelError(
                f"--precision bf16: {hardware.name} "
                f"(compute capability {hardware.capability[0]}.{hardware.capability[1]}) has no bf16 units; use fp16"
            )
        return requested, "set by --precision"
    if hardware.device != "cuda" or hardware.capability is None:
        return "fp32", f"no CUDA GPU ({hardware.name}): full precision"
    major, minor = hardware.capability
    if hardware.capability >= (8, 0):
        return (
            "bf16",
            f"{hardware.name} has compute capability {major}.{minor} >= 8.0: bf16 units (no loss scaling needed)",
        )
    return (
        "fp16",
        f"{hardware.name} has compute capability {major}.{minor} < 8.0: fp16 with loss scaling (no bf16 units)",
    )


def autocast_context(precision: str, device: torch.device | str) -> Any:
    """torch.autocast for `precision` on a CUDA device; a no-op for fp32 or off CUDA."""
    dtype = AUTOCAST_DTYPES[precision]
    device = torch.device(device)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def device_precision(device: torch.device | str) -> str:
    """The precision gpt2ft trains in on `device` (choose_precision's automatic rule), for evaluation outside
    training."""
    device = torch.device(device)
    return choose_precision("auto", cuda_hardware(device))[0] if device.type == "cuda" else "fp32"


@contextlib.contextmanager
def without_kv_cache(model: Any):
    """Run forward passes with the model's KV cache off, whatever the caller passes.

    Packed rows rely on it: GPT-2's SDPA attention turns restarting `position_ids` into a block-diagonal mask (so no
    token attends across a dialogue boundary) only when no cache is in play. Setting it on the config makes every
    forward -- the Trainer's, the library's own prediction_step, gpt2ft's evaluation -- safe by construction.
    """
    config = model.config
    was = getattr(config, "use_cache", True)
    config.use_cache = False
    try:
        yield model
    finally:
        config.use_cache = was
