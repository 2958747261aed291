"""The model families gpt2ft fine-tunes, and the checks of a `--model` that need no library: what a local folder
holds, whether its architecture is one gpt2ft supports, and how many parameters its config describes.

    python -m gpt2ft train --model gpt2                        # GPT-2, every size
    python -m gpt2ft train --model ./SmolLM2-135M-Instruct     # Llama (SmolLM2, Llama 3.2), Qwen2/Qwen3, Mistral

Every family here is a decoder-only causal LM that transformers loads without remote code and that fits a Colab T4
at 135M-1.5B parameters with the right method. Each brings its LoRA targets (the attention and MLP projections of
its blocks). This module reads only JSON: the command line checks a folder with it before torch loads, so a typo or
an unsupported model is one line at once.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ModelError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# A config describing more parameters than this is no model any machine gpt2ft runs on holds (an 80 GB GPU holds
# ~20B in fp32 for inference alone); refusing it before building anything keeps a broken or hostile config.json
# from hanging the process while it allocates.
MAX_PARAMETERS = 100e9


@dataclass(frozen=True)
class Family:
    """A model family: its `model_type`s in config.json, its name for people, and its default LoRA targets."""

    name: str
    model_types: tuple[str, ...]
    lora_targets: tuple[str, ...]


LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = (
    # GPT-2's Conv1D modules: c_attn (q, k, v), c_proj (attention and MLP output), c_fc (MLP input).
    Family("GPT-2", ("gpt2",), ("c_attn", "c_proj")),
    Family("Llama (SmolLM2, Llama 3.2)", ("llama",), LLAMA_STYLE_TARGETS),
    Family("Qwen2 / Qwen2.5", ("qwen2",), LLAMA_STYLE_TARGETS),
    Family("Qwen3", ("qwen3",), LLAMA_STYLE_TARGETS),
    Family("Mistral", ("mistral",), LLAMA_STYLE_TARGETS),
)
SUPPORTED_TYPES = tuple(model_type for family in FAMILIES for model_type in family.model_types)


def family_of(model_type: str | None) -> Family | None:
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def supported_list() -> str:
    return ", ".join(f"{family.name} ({'/'.join(family.model_types)})" for family in FAMILIES)


def check_architecture(config: Mapping[str, Any], name: str) -> Family:
    """The family of a model config (config.json's content, or a transformers config's `to_dict()`).

    Raises:
        ModelError: one line naming what was found and what gpt2ft supports (an encoder, an encoder-decoder, a
            model that needs remote code, a family gpt2ft does not know).
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    family = family_of(model_type)
    if family is None:
        found = f"model_type {model_type!r}" + (f" ({', '.join(map(str, architectures))})" if architectures else "")
        why = ""
        if config.get("auto_map"):
            why = " that needs remote code (gpt2ft never runs a model's own code)"
        elif config.get("is_encoder_decoder"):
            why = ", an encoder-decoder"
        elif architectures and not any(
            str(arch).endswith("ForCausalLM") or "LMHead" in str(arch) for arch in architectures
        ):
            why = ", not a causal language model"
        raise ModelError(f"--model {name}: {found}{why}; gpt2ft fine-tunes decoder-only causal LMs: {supported_list()}")
    return family


def looks_like_path(name: str) -> bool:
    """Whether `--model` names a local folder rather than a Hub id (OWNER/NAME, or one of the few old names without
    an owner, such as `gpt2`): it exists; it starts with `.`, `/` or `~` or ends with a separator; it has more
    separators than a Hub id; its first part is a folder here (`models/smol` beside `models/`); or it is a bare name
    close to a model folder here (`gpt2_finetund` beside `gpt2_finetuned`: a typo, not a Hub id)."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)):
        return True
    if name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    if "/" in name:
        return Path(name.split("/", 1)[0]).is_dir()
    return similar_folder(name) is not None


def similar_folder(name: str) -> str | None:
    """A model folder in the working folder whose name is close to `name` (a typo of it), or None."""
    folders = [entry.name for entry in Path(".").iterdir() if entry.is_dir() and (entry / "config.json").is_file()]
    close = difflib.get_close_matches(name, folders, n=1, cutoff=0.8)
    return close[0] if close else None


def read_config_file(path: Path, name: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"--model {name}: config.json is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise ModelError(f"--model {name}: config.json does not hold a JSON object")
    return config


def check_model_source(name: str, flag: str = "--model") -> dict[str, Any] | None:
    """Check a local model folder before any library touches it: a config.json of a supported family with a sane
    size, safetensors weights (never pickle-only) and tokenizer files. A Hub id is left to the loader.

    Returns:
        The folder's config.json content, or None for a Hub id.

    Raises:
        ModelError: one line naming the folder (as `flag`) and what is wrong.
    """
    path = Path(name).expanduser()
    if not looks_like_path(name):
        check_hub_reachable(name, flag)
        return None
    if not path.is_dir():
        typo = similar_folder(Path(name).name)
        raise ModelError(f"{flag} {name}: no such model folder" + (f" (did you mean {typo}?)" if typo else ""))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{flag} {name}: no config.json (expected a folder written by save_pretrained)")
    config = read_config_file(config_path, name)
    check_architecture(config, name)
    check_size(config, name)
    if not any((path / weights).is_file() for weights in SAFE_WEIGHTS):
        pickles = [weights for weights in PICKLE_WEIGHTS if (path / weights).is_file()]
        if pickles:
            raise ModelError(
                f"{flag} {name}: only pickle weights ({', '.join(pickles)}); gpt2ft loads safetensors only, because "
                "unpickling can run arbitrary code. Convert them once with transformers' save_pretrained in a trusted "
                "environment."
            )
        raise ModelError(f"{flag} {name}: no model.safetensors weights")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{flag} {name}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return config


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a connection within `timeout` seconds (asked once a process: every check of a
    `--model` in one command would otherwise open a connection of its own)."""
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_hub_reachable(name: str, flag: str = "--model") -> None:
    """A Hub id that is neither in the local Hugging Face cache nor reachable is one line at once, instead of a
    minute of the Hub client's retries and then an error that never says the name is not a folder here.

    Raises:
        ModelError: the id is not cached and the Hub is offline (HF_HUB_OFFLINE) or does not answer.
    """
    # Deferred: huggingface_hub is needed only for a Hub id, and the command line checks folders before it loads.
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: it loads without the network
    if constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT):
        why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise ModelError(f"{flag} {name}: not a local folder, and {why} (it is not in the local Hugging Face cache)")


def integer(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that the config has, as an int (GPT-2 and Llama name the same sizes differently)."""
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} is {value!r}")
            return int(value)
    if default is None:
        raise ValueError(f"no {' or '.join(keys)}")
    return default


def parameter_count(config: Mapping[str, Any]) -> int:
    """How many parameters a config describes (tied embeddings counted once), from its sizes alone: exact for GPT-2
    and the Llama-style families (checked against transformers' models in tests/test_families.py).

    Raises:
        ValueError: a size is missing or not a number.
    """
    vocab = integer(config, "vocab_size")
    width = integer(config, "hidden_size", "n_embd")
    layers = integer(config, "num_hidden_layers", "n_layer")
    model_type = config.get("model_type")
    tied = bool(config.get("tie_word_embeddings", True))
    if model_type == "gpt2":
        inner = integer(config, "n_inner", default=4 * width)
        positions = integer(config, "n_positions", "max_position_embeddings", default=1024)
        block = 4 * width + (3 * width * width + 3 * width) + (width * width + width)  # 2 norms, attention
        block += width * inner + inner + inner * width + width  # MLP
        return layers * block + vocab * width + positions * width + 2 * width + (0 if tied else vocab * width)
    heads = integer(config, "num_attention_heads")
    kv_heads = integer(config, "num_key_value_heads", default=heads)
    head_dim = integer(config, "head_dim", default=width // max(heads, 1))
    inner = integer(config, "intermediate_size")
    attention = width * heads * head_dim + 2 * width * kv_heads * head_dim + heads * head_dim * width
    if model_type == "qwen2" or config.get("attention_bias"):
        attention += heads * head_dim + 2 * kv_heads * head_dim + (width if config.get("attention_bias") else 0)
    if model_type == "qwen3":
        attention += 2 * head_dim  # q_norm and k_norm
    mlp = 3 * width * inner + (2 * inner + width if config.get("mlp_bias") else 0)
    block = attention + mlp + 2 * width
    return layers * block + vocab * width + width + (0 if tied else vocab * width)


def check_size(config: Mapping[str, Any], name: str) -> int:
    """The config's parameter count, refused when it is beyond any machine (a hostile or broken config.json would
    otherwise make transformers allocate for minutes, or forever). Returns the count (0 when it cannot be told)."""
    try:
        count = parameter_count(config)
    except ValueError as error:
        raise ModelError(f"--model {name}: config.json has an unusable size ({error})") from None
    except TypeError:
        return 0
    if count > MAX_PARAMETERS:
        raise ModelError(
            f"--model {name}: config.json describes {count:.3g} parameters, beyond any machine gpt2ft runs on "
            f"(limit {MAX_PARAMETERS:.0e}); check its sizes"
        )
    return count
