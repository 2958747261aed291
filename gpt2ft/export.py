"""Export a fine-tuned model to GGUF, to run it where Python is not: llama.cpp, Ollama, LM Studio.

    python -m gpt2ft export --model gpt2_finetuned                      # gpt2_finetuned-f16.gguf + .Modelfile
    python -m gpt2ft export --model smollm2_finetuned --outtype q8_0 --output chat.gguf
    ollama create gpt2ft -f gpt2_finetuned-f16.Modelfile && ollama run gpt2ft

Every family gpt2ft trains exports: GPT-2 (llama.cpp architecture `gpt2`), Llama (SmolLM2, Llama 3.2) and Mistral
(both `llama`), Qwen2 (`qwen2`) and Qwen3 (`qwen3`). The `gguf` package (llama.cpp's own Python library, from PyPI)
does the work: GGUFWriter writes the file, TensorNameMap gives llama.cpp's name for each tensor of each architecture,
gguf.quants does q8_0, SpecialVocab reads the BPE merges. What is gpt2ft's own is small, and follows llama.cpp's
converter (`convert_hf_to_gguf.py`: GPT2Model, LlamaModel, Qwen2Model, Qwen3Model):

- GPT-2's Conv1D stores its weights (in, out), transposed relative to nn.Linear's (out, in), which is the layout
  llama.cpp reads; they are transposed on the way out.
- llama.cpp's `llama` rotates interleaved pairs of each head's dimensions, transformers' Llama its two halves, so the
  rows of the query and key projections are permuted (the converter's `LlamaModel.permute`); Qwen's rope is NEOX,
  the halves layout itself, and is written as it is.
- Tied embeddings (GPT-2, SmolLM2, Qwen3's small sizes) are written once, as the token embedding, which llama.cpp
  reuses as the output layer; an untied output layer (Qwen2.5, Mistral) is written as `output`.
- 1-D tensors (biases, norms) and GPT-2's position embedding stay f32 in every outtype, as the converter keeps them.
- The tokenizer is written as llama.cpp's `gpt2` (byte-level BPE) vocabulary, with the pre-tokenizer that splits text
  as the model's own does: the converter's name for it when the tokenizer is one the converter knows (it tokenises
  a check text, as the converter does), else the name whose regex is the one in tokenizer.json.
- The chat template is the model's own (gpt2ft's training format for GPT-2), without `{% generation %}` markers,
  which only transformers understands; it renders the same string (tests/test_export.py checks it through llama.cpp).

What llama.cpp would run differently (another activation, rope scaling other than linear or Llama 3's, sliding-window
layers, a tokenizer that is not byte-level BPE) is refused with one line before anything is written. Beside the GGUF
goes an Ollama Modelfile: the chat format as an Ollama (Go) template where it is gpt2ft's or ChatML, the template's
end-of-turn token as the stop, and the sampling defaults of the model's generation_config.json. A LoRA run's folder
holds the merged model, so it exports like a full run. Files are written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from .chat_format import CHAT_TEMPLATE
from .colab import in_colab
from .errors import Gpt2ftError

# gguf, torch, transformers (and gpt2ft's modeling and generate, which import torch) are imported inside the
# functions that export: the CLI imports this module for its choices and checks the flags with them before any of
# those load. google.colab exists only on Colab.

FORMATS = ("gguf",)
OUTTYPES = ("f32", "f16", "q8_0")
DEFAULT_OUTTYPE = "f16"
# llama.cpp's architecture for each model_type gpt2ft trains (families.py); Mistral runs as `llama`, as the converter
# maps MistralForCausalLM.
GGUF_ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# The architectures whose rope llama.cpp applies to interleaved pairs (LLAMA_ROPE_TYPE_NORM): their q/k rows are
# permuted from transformers' halves layout. qwen2 and qwen3 use NEOX rope, transformers' own layout.
PERMUTED_ARCHITECTURES = ("llama",)
# ggml's GELU is the tanh approximation (transformers' gelu_new); exact GELU differs from it by < 1e-3.
GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
# llama.cpp's Llama and Qwen graphs gate their MLP with SiLU.
SILU_ACTIVATIONS = ("silu", "swish")
# The rope types written as they are (default), as llama.cpp's linear scaling, or as Llama 3's frequency factors.
ROPE_TYPES = ("default", "linear", "llama3")
# Ollama's num_ctx: the model's context up to this. A long-context model's full window (131k tokens for Llama 3.2)
# would have Ollama allocate gigabytes of KV cache for chats that never use it; SmolLM2 keeps its whole 8,192.
MODELFILE_MAX_CONTEXT = 8192
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")

# How llama.cpp's converter names a tokenizer's pre-tokenizer (convert_hf_to_gguf.py, get_vocab_base_pre): it
# tokenises this text and looks the sha256 of the ids' list up. The entries are the converter's for the tokenizers of
# the families gpt2ft trains (a fine-tune keeps its base model's tokenizer, and so its hash).
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
# The split regexes of Llama 3's and Qwen2's tokenizer.json, and the llama.cpp pre-tokenizers that apply them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# A tokenizer.json pre_tokenizer (its steps, as pre_tokenizer_steps describes them) -> llama.cpp's name for it.
# GPT-2's ByteLevel regex alone is llama.cpp's `gpt-2` (the tests' tiny tokenizers, GPT-2's); individual digits first
# is `smollm`.
PRE_TOKENIZERS = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",
    (f"Split({LLAMA3_SPLIT})", "ByteLevel"): "llama-bpe",
    (f"Split({QWEN2_SPLIT})", "ByteLevel"): "qwen2",
}


class ExportError(Gpt2ftError, ValueError):
    """The export cannot be done as asked; the message names the argument or file and why."""


@dataclass
class ExportResult:
    """What `export_gguf` wrote: the GGUF file and its Ollama Modelfile, and what they hold."""

    gguf_path: Path
    modelfile_path: Path
    outtype: str
    size_bytes: int
    tensors: int
    seconds: float
    architecture: str = "gpt2"


# --------------------------------------------------------------------------------------------------------------
# Config, paths and checks
# --------------------------------------------------------------------------------------------------------------


def add_n_ctx(config: Any) -> Any:
    """Give a GPT-2 config `n_ctx` (= `n_positions`), the key llama.cpp's own converter reads for the context length.

    transformers dropped `n_ctx` from GPT2Config, so folders saved by it lack the key and `convert_hf_to_gguf.py`
    stops with `KeyError: 'n_ctx'`. Set it before `save_pretrained`: config.json keeps it and AutoConfig loads it
    back as a plain attribute. Returns the config.
    """
    from .modeling import config_context  # torch: imported only when exporting

    config.n_ctx = config_context(config)
    return config


def gguf_chat_template(template: str | None) -> str:
    """The chat template to embed: the model's own (gpt2ft's when it has none, as in models saved before templates)
    without `{% generation %}` markers, which only transformers' renderer knows; the rendered text is the same."""
    return GENERATION_TAG.sub("", template or CHAT_TEMPLATE)


def output_paths(model_dir: str | Path, outtype: str, output: str | Path | None = None) -> tuple[Path, Path]:
    """Where the GGUF and its Modelfile go: `output`, or `<folder name>-<outtype>.gguf` beside the model folder;
    the Modelfile is the GGUF's name with `.Modelfile`, in the same folder (Ollama resolves FROM from there).

    Returns:
        (gguf_path, modelfile_path)
    """
    folder = Path(model_dir).expanduser().resolve()
    gguf_path = Path(output).expanduser() if output else folder.parent / f"{folder.name}-{outtype}.gguf"
    return gguf_path, gguf_path.with_suffix(".Modelfile")


def check_export_request(model_dir: str, outtype: str, gguf_path: Path, modelfile_path: Path, overwrite: bool) -> None:
    """Check everything that can be checked before the model is loaded.

    Raises:
        ExportError: unknown outtype, output already there (without overwrite), output folder missing, or a
            LoRA adapter folder given instead of its run folder.
        ModelError: not a local folder of a supported family with safetensors weights and a tokenizer.
    """
    from .modeling import ModelError, check_model_source  # torch: imported only when exporting

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype}: unknown; choose one of {', '.join(OUTTYPES)}")
    folder = Path(model_dir).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ExportError(
            f"--model {model_dir}: a LoRA adapter alone; export the run folder that holds it "
            f"({folder.resolve().parent}), whose model.safetensors is the merged model"
        )
    if not folder.is_dir():
        raise ModelError(f"--model {model_dir}: no such model folder (export needs a local folder written by train)")
    check_model_source(str(folder))
    if gguf_path.suffix != ".gguf":
        raise ExportError(f"--output {gguf_path}: must end in .gguf")
    if not gguf_path.parent.is_dir():
        raise ExportError(f"--output {gguf_path}: folder {gguf_path.parent} does not exist")
    for path in (gguf_path, modelfile_path):
        if path.exists() and not overwrite:
            raise ExportError(f"{path}: already exists (pass --overwrite to replace it)")


def gguf_architecture(config: Any, model_dir: str) -> str:
    """llama.cpp's architecture for the model (`gpt2`, `llama`, `qwen2`, `qwen3`).

    Raises:
        ExportError: a model_type gpt2ft has no GGUF mapping for.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        known = ", ".join(f"{key} (as {value})" for key, value in GGUF_ARCHITECTURES.items())
        raise ExportError(f"--model {model_dir}: model_type {model_type!r} has no llama.cpp export here; {known} do")
    return GGUF_ARCHITECTURES[model_type]


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope settings of a Llama-style config, in transformers 5's `rope_parameters` shape ({"rope_type",
    "rope_theta", "factor", ...}), also from an older config's `rope_theta` and `rope_scaling`."""
    saved = getattr(config, "rope_parameters", None)
    if isinstance(saved, Mapping) and saved:
        parameters = dict(saved)
    else:
        parameters = dict(getattr(config, "rope_scaling", None) or {})
        parameters.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    parameters["rope_type"] = parameters.get("rope_type") or parameters.get("type") or "default"
    return parameters


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def gguf_context(config: Any, architecture: str) -> int:
    """The context length to write: the config's (`n_positions` / `max_position_embeddings`); for a Mistral with a
    sliding window, at most the window, within which its attention is llama.cpp's full attention exactly."""
    from .modeling import config_context  # torch: imported only when exporting

    context = config_context(config)
    window = getattr(config, "sliding_window", None) if architecture == "llama" else None
    return min(context, int(window)) if isinstance(window, int) and window > 0 else context


def check_gguf_compatible(config: Any, model_dir: str) -> str:
    """Refuse a model whose computation llama.cpp's graph for its architecture does not reproduce as written.

    Returns:
        The architecture.

    Raises:
        ExportError: one line naming every problem: for GPT-2, a non-GELU activation, unscaled or layer-scaled
            attention, or cross-attention; for the Llama-style families, a non-SiLU activation, rope scaling other
            than linear (or Llama 3's, on `llama`), sliding-window layers, or biases llama.cpp does not load.
    """
    architecture = gguf_architecture(config, model_dir)
    problems = []
    if architecture == "gpt2":
        activation = getattr(config, "activation_function", "gelu_new")
        if activation not in GELU_ACTIVATIONS:
            problems.append(f"activation_function {activation!r} (llama.cpp's GPT-2 uses GELU)")
        if not getattr(config, "scale_attn_weights", True):
            problems.append("scale_attn_weights false")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            problems.append("scale_attn_by_inverse_layer_idx true")
        if getattr(config, "add_cross_attention", False):
            problems.append("cross-attention layers")
    else:
        activation = getattr(config, "hidden_act", "silu")
        if activation not in SILU_ACTIVATIONS:
            problems.append(f"hidden_act {activation!r} (llama.cpp's {architecture} gates its MLP with SiLU)")
        rope = rope_parameters(config)
        if rope["rope_type"] not in ROPE_TYPES or (rope["rope_type"] == "llama3" and architecture != "llama"):
            problems.append(f"rope_type {rope['rope_type']!r} (gpt2ft converts {', '.join(ROPE_TYPES[:2])}, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']}")
        layer_types = set(getattr(config, "layer_types", None) or ())
        if getattr(config, "use_sliding_window", False) or layer_types - {"full_attention"}:
            problems.append("sliding-window attention layers (llama.cpp's graph attends to the whole context)")
        if architecture != "llama" and getattr(config, "mlp_bias", False):
            problems.append("mlp_bias true")
        if architecture == "qwen3" and getattr(config, "attention_bias", False):
            problems.append("attention_bias true")
    if problems:
        raise ExportError(
            f"--model {model_dir}: llama.cpp's {architecture} cannot run this model: {'; '.join(problems)}"
        )
    return architecture


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------


def tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's tokenizer.json content (model, pre_tokenizer, normalizer, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def pre_tokenizer_steps(pre_tokenizer: Mapping[str, Any] | None) -> tuple[str, ...]:
    """A tokenizer.json pre_tokenizer as the short descriptions PRE_TOKENIZERS is keyed by: `ByteLevel(regex)` (with
    GPT-2's regex), `ByteLevel` (bytes only), `Digits(individual)`, `Split(<regex>)` (isolated matches), or the step's
    JSON for anything else (which matches no entry)."""
    if not pre_tokenizer:
        return ()
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    described = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            described.append("ByteLevel(regex)" if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits" and step.get("individual_digits"):
            described.append("Digits(individual)")
        elif (
            kind == "Split"
            and "Regex" in (step.get("pattern") or {})
            and step.get("behavior") == "Isolated"
            and not step.get("invert")
        ):
            described.append(f"Split({step['pattern']['Regex']})")
        else:
            described.append(json.dumps(step, sort_keys=True))
    return tuple(described)


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`): the converter's, by the hash of the check text's
    ids, for a tokenizer it knows (SmolLM2 is `smollm`, Llama 3 `llama-bpe`, Qwen `qwen2`); else the one whose regex
    is the tokenizer's own, from its pre_tokenizer config (GPT-2's ByteLevel alone is `gpt-2`).

    Raises:
        ExportError: a pre-tokenizer llama.cpp has no equivalent of here (it would split text differently).
    """
    digest = sha256(str(list(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT))).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    state = tokenizer_state(tokenizer)
    normalizer = state.get("normalizer") or {}
    steps = pre_tokenizer_steps(state.get("pre_tokenizer"))
    if steps in PRE_TOKENIZERS and normalizer.get("type") in (None, "NFC"):
        return PRE_TOKENIZERS[steps]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({', '.join(steps) or 'none'}) is none llama.cpp has: GPT-2's, SmolLM's, "
        "Llama 3's or Qwen2's byte-level split (llama.cpp would tokenise text differently)"
    )


def looks_special(token: str) -> bool:
    """Added tokens the converter marks CONTROL even when not flagged special (`<|...|>`)."""
    return token.startswith("<|") and token.endswith("|>")


def check_byte_level_bpe(tokenizer: Any) -> None:
    """Refuse a tokenizer llama.cpp's `gpt2` vocabulary cannot stand for.

    Raises:
        ExportError: not a byte-level BPE (GPT-2's, SmolLM2's, Llama 3's, Qwen's): a SentencePiece-style BPE with
            byte fallback, a WordPiece, a Unigram.
    """
    state = tokenizer_state(tokenizer)
    model = state.get("model") or {}
    pre_tokenizer = state.get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise ExportError(
            "the tokenizer is not a byte-level BPE (GPT-2's, SmolLM2's, Llama 3's, Qwen's), the only kind gpt2ft "
            "writes as llama.cpp's gpt2 vocabulary"
        )


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token of the vocabulary in id order (byte-level strings, as in vocab.json) with its GGUF token type:
    CONTROL for special tokens (`<|endoftext|>`, `<|im_end|>`), USER_DEFINED for other added tokens, NORMAL for the
    BPE vocabulary. Ids the tokenizer does not use (a vocabulary padded in the config) become `[PAD<id>]`, UNUSED, as
    llama.cpp's converter writes them.

    Raises:
        ExportError: the tokenizer is not a byte-level BPE (check_byte_level_bpe).
    """
    import gguf

    check_byte_level_bpe(tokenizer)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            token = added[index]
            tokens.append(token.content)
            control = token.special or looks_special(token.content)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(kind) for kind in types]


def added_special_tokens(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer itself adds BOS before and EOS after a text (Llama 3 adds BOS; GPT-2, SmolLM2 and Qwen add
    neither): llama.cpp's `add_bos_token` / `add_eos_token`."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a"))
    if len(full) == len(plain):
        return {"bos": False, "eos": False}
    return {
        "bos": tokenizer.bos_token_id is not None
        and full[0] == tokenizer.bos_token_id
        and full[1:][: len(plain)] == plain,
        "eos": tokenizer.eos_token_id is not None
        and full[-1] == tokenizer.eos_token_id
        and full[:-1][-len(plain) :] == plain,
    }


def add_tokenizer(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int) -> None:
    """Tokens, merges, pre-tokenizer, special ids and the chat template, the way llama.cpp reads a byte-level BPE
    vocabulary (`tokenizer.ggml.model` gpt2, as the converter writes GPT-2's, SmolLM2's, Llama 3's and Qwen's).

    The special ids are the loaded tokenizer's (GPT-2 has no pad token and gpt2ft pads with EOS), else those the
    model's files name (Qwen's BOS is config.json's); `add_bos` is whether the tokenizer adds BOS itself, so a prompt
    llama.cpp tokenises starts as transformers' does. The template's end-of-turn token, when it is not EOS, is also
    written as EOT, which llama.cpp stops at.
    """
    import gguf

    from .chat_format import end_of_turn

    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"--model {model_dir}: no BPE merges in tokenizer.json or merges.txt")
    for kind, token_id in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    turn_end = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))
    if turn_end is not None and turn_end != tokenizer.eos_token_id:
        special.special_token_ids["eot"] = int(turn_end)
    special.add_special_token = added_special_tokens(tokenizer)
    special.chat_template = gguf_chat_template(getattr(tokenizer, "chat_template", None))
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------------------------------------------
# Hyperparameters and tensors
# --------------------------------------------------------------------------------------------------------------


def add_hyperparameters(
    writer: Any, config: Any, architecture: str, name: str, file_type: int, generation: dict[str, Any]
) -> None:
    """The model's shape under llama.cpp's `<architecture>.*` keys, as the converter writes them (GPT2Model's for
    GPT-2; TextModel's and LlamaModel's for the others: kv heads, head size, rope base and scaling, RMS norm epsilon),
    plus the name and sampling defaults."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(gguf_context(config, architecture))
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    if architecture == "gpt2":
        writer.add_feed_forward_length(getattr(config, "n_inner", None) or 4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_vocab_size(config.vocab_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
        writer.add_rope_dimension_count(head_dim(config))
        rope = rope_parameters(config)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # general.sampling.*: the defaults llama.cpp's tools start from (Ollama takes them from the Modelfile).
    if generation.get("do_sample"):
        if generation.get("temperature") is not None:
            writer.add_sampling_temp(float(generation["temperature"]))
        if generation.get("top_p") is not None:
            writer.add_sampling_top_p(float(generation["top_p"]))
        if generation.get("top_k") is not None:
            writer.add_sampling_top_k(int(generation["top_k"]))


def permute_rope_rows(weights: Any, heads: int) -> Any:
    """Reorder each head's rows of a query/key projection (weight or bias) from transformers' rope layout (the first
    half of the head's dimensions rotated with the second) to llama.cpp's (adjacent pairs rotated together): the
    converter's `LlamaModel.permute`."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def rope_frequency_factors(rope: Mapping[str, Any], dimensions: int) -> Any:
    """Llama 3's rope scaling as llama.cpp reads it: one divisor per rotated frequency (`rope_freqs.weight`), computed
    as the converter's LlamaModel.generate_extra_tensors does (transformers' `_compute_llama3_parameters` divides the
    same frequencies by the same amounts)."""
    import math

    import numpy as np

    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    factors = []
    for frequency in 1.0 / (base ** (np.arange(0, dimensions, 2, dtype=np.float32) / dimensions)):
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def model_tensors(model: Any, architecture: str) -> Iterator[tuple[str, Any]]:
    """Every weight as (llama.cpp name, float32 array in llama.cpp's layout): names from gguf's TensorNameMap for the
    architecture; GPT-2's Conv1D weights transposed; `llama`'s q/k rows permuted; the output layer skipped when it
    is the token embedding (`get_output_embeddings` tied to `get_input_embeddings`); Llama 3's rope factors added.

    Raises:
        ExportError: a weight with no llama.cpp name (not a plain model of its family).
    """
    import gguf
    from transformers.pytorch_utils import Conv1D

    config = model.config
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    output_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, parameter in model.named_parameters(remove_duplicate=False):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"weight {name!r} has no llama.cpp {architecture} name: not a plain model of its family")
        if tied and gguf_name == output_name:
            continue
        data = parameter.detach().float()
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, Conv1D) and name.endswith(".weight"):
            data = data.t()
        if architecture in PERMUTED_ARCHITECTURES:
            if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
                data = permute_rope_rows(data, heads)
            elif gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
                data = permute_rope_rows(data, kv_heads)
        yield gguf_name, data.numpy()
    if architecture != "gpt2":
        rope = rope_parameters(config)
        if rope["rope_type"] == "llama3":
            factors = rope_frequency_factors(rope, head_dim(config))
            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def tensor_type(gguf_name: str, data: Any, outtype: str) -> Any:
    """The GGML type a tensor is stored in: f32 for 1-D tensors and the position embedding (as llama.cpp's converter
    keeps them), else the outtype's; q8_0 falls back to f16 for a row length that is not a multiple of its block
    (32)."""
    import gguf

    if data.ndim <= 1 or gguf_name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]) or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if outtype == "q8_0":
        block_size, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        if data.shape[-1] % block_size == 0:
            return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def add_tensors(writer: Any, model: Any, architecture: str, outtype: str) -> int:
    """Queue every weight under its llama.cpp name, converted lazily: each tensor is cast or quantised only when the
    writer reaches it, so a large export needs the model's memory plus one tensor, not a second copy.

    Returns:
        The number of tensors written.
    """
    import gguf

    count = 0
    for gguf_name, data in model_tensors(model, architecture):
        array = gguf.LazyNumpyTensor.from_eager(data)
        qtype = tensor_type(gguf_name, array, outtype)
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        count += 1
    return count


# --------------------------------------------------------------------------------------------------------------
# The Ollama Modelfile
# --------------------------------------------------------------------------------------------------------------

CHATML_PROBES = (
    [{"role": "user", "content": "u1"}],
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
    [
        {"role": "system", "content": "s1"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ],
)


def render_chatml(messages: Sequence[Mapping[str, str]], default_system: str | None) -> str:
    """ChatML ready for the assistant's turn, with `default_system` as the system turn of a conversation that opens
    without one (SmolLM2's, Qwen2.5's templates) or none (None): what `chatml_ollama_template` writes as Go."""
    text = ""
    if messages and messages[0]["role"] != "system" and default_system is not None:
        text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for message in messages:
        text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def chatml_default_system(tokenizer: Any) -> tuple[bool, str | None]:
    """Whether the tokenizer's chat template renders plain ChatML (ready for the assistant's turn) for the probe
    conversations, and its default system message if it writes one for a conversation without its own.

    Returns:
        (is ChatML, default system message or None)
    """
    from .chat_format import template_of

    def render(messages: Sequence[Mapping[str, str]]) -> str:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template_of(tokenizer), tokenize=False, add_generation_prompt=True
        )

    try:
        first = render(CHATML_PROBES[0])
        system = None
        opening = "<|im_start|>system\n"
        if first.startswith(opening) and "<|im_end|>\n" in first:
            system = first[len(opening) : first.index("<|im_end|>\n")]
        chatml = all(render(probe) == render_chatml(probe, system) for probe in CHATML_PROBES)
    except Exception:  # a template that needs more than messages (tools, dates) is not plain ChatML
        return False, None
    return chatml, system


def ollama_template(tokenizer: Any) -> tuple[str | None, str]:
    """The chat format as an Ollama (Go) template, and a comment line saying what it is.

    gpt2ft's format: EOS, then every message followed by EOS, with no role names (a system message is a first turn,
    as in gpt2ft.chat_format). Ollama has no `trim`, so messages are used as typed. ChatML (SmolLM2, Qwen): every
    message as `<|im_start|>role\\ncontent<|im_end|>\\n`, then `<|im_start|>assistant\\n`, after the template's default
    system message when the conversation opens without one. Any other template gives None: Ollama then picks its
    template from the GGUF's chat template.
    """
    from .chat_format import template_of

    template = template_of(tokenizer)
    if gguf_chat_template(template) == gguf_chat_template(CHAT_TEMPLATE):
        eos = tokenizer.eos_token
        return (
            f"{eos}{{{{ range .Messages }}}}{{{{ .Content }}}}{eos}{{{{ end }}}}",
            "# The training format: EOS, then every turn followed by EOS, no role names.",
        )
    chatml, system = chatml_default_system(tokenizer)
    if not chatml or (system is not None and ("{{" in system or '"""' in system)):
        return None, "# No TEMPLATE: Ollama takes the chat format from the GGUF's chat template."
    turns = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    if system is None:
        return turns, "# ChatML, as the model's chat template writes it."
    condition = '{{- if and .Messages (ne (index .Messages 0).Role "system") }}'
    opening = f"{condition}<|im_start|>system\n{system}<|im_end|>\n{{{{ end }}}}"
    return (
        opening + turns,
        "# ChatML, as the model's chat template writes it, with its system message when a chat has none.",
    )


def build_modelfile(
    gguf_name: str,
    stop: str,
    context: int,
    generation: dict[str, Any],
    template: str | None = None,
    comment: str = "",
) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (in the same folder).

    The TEMPLATE is `template` (ollama_template's; left out when None). The stop is the chat format's end-of-turn
    token (`<|endoftext|>` in gpt2ft's format, `<|im_end|>` in ChatML). repeat_penalty 1 turns off Ollama's default
    penalty, which would also penalise the end-of-turn tokens of the prompt and keep the model from ending its turn
    (gpt2ft.generate sets none for the same reason); num_ctx is the model's context, at most MODELFILE_MAX_CONTEXT.
    """
    lines = [
        "# Ollama Modelfile written by `python -m gpt2ft export`:",
        f"#   ollama create gpt2ft -f {Path(gguf_name).with_suffix('.Modelfile').name}",
        "#   ollama run gpt2ft",
        f"FROM ./{gguf_name}",
        "",
    ]
    if comment:
        lines.append(comment)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [
        "",
        f'PARAMETER stop "{stop}"',
        f"PARAMETER num_ctx {min(context, MODELFILE_MAX_CONTEXT)}",
        "PARAMETER repeat_penalty 1.0",
    ]
    if generation.get("do_sample", False):
        for key, parameter in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if generation.get(key) is not None:
                lines.append(f"PARAMETER {parameter} {generation[key]}")
    else:
        lines.append("PARAMETER temperature 0")  # saved as greedy
    if generation.get("max_new_tokens"):
        lines.append(f"PARAMETER num_predict {generation['max_new_tokens']}")
    return "\n".join(lines) + "\n"


def tokenizer_modelfile(gguf_name: str, tokenizer: Any, context: int, generation: dict[str, Any]) -> str:
    """The Modelfile for a model with this tokenizer: its chat format as the TEMPLATE, its end of turn as the stop."""
    from .chat_format import end_of_turn

    template, comment = ollama_template(tokenizer)
    return build_modelfile(gguf_name, end_of_turn(tokenizer), context, generation, template, comment)


# --------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------


def read_generation_settings(model_dir: str | Path) -> dict[str, Any]:
    """The sampling defaults saved with the model (generation_config.json); gpt2ft's defaults for a folder without
    one (every model gpt2ft trains has one)."""
    from .generate import GENERATION_DEFAULTS

    path = Path(model_dir) / "generation_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(GENERATION_DEFAULTS)
    return saved if isinstance(saved, dict) else dict(GENERATION_DEFAULTS)


def export_gguf(
    model_dir: str | Path, outtype: str = DEFAULT_OUTTYPE, output: str | Path | None = None, overwrite: bool = False
) -> ExportResult:
    """Write the model in `model_dir` as one GGUF file (weights, hyperparameters, tokenizer, chat template) with an
    Ollama Modelfile beside it.

    Args:
        model_dir: a folder written by `train` (a LoRA run's folder holds the merged model), or any save_pretrained
            folder of a family gpt2ft trains, with safetensors weights and a byte-level BPE tokenizer.
        outtype: f32 (exact), f16 (half the size) or q8_0 (8-bit blocks, about a quarter of f32).
        output: the GGUF path; default `<folder name>-<outtype>.gguf` beside the folder.
        overwrite: replace existing output files.

    Raises:
        ExportError, ModelError: bad arguments or model (checked before anything is written; nothing is left behind).
    """
    import gguf

    from .modeling import load_model, load_model_config, load_tokenizer  # torch: imported only when exporting

    start = time.perf_counter()
    model_dir = str(model_dir)
    gguf_path, modelfile_path = output_paths(model_dir, outtype, output)
    check_export_request(model_dir, outtype, gguf_path, modelfile_path, overwrite)
    architecture = check_gguf_compatible(load_model_config(model_dir), model_dir)
    tokenizer = load_tokenizer(model_dir)
    try:
        check_byte_level_bpe(tokenizer)
        pre_tokenizer_name(tokenizer)
    except ExportError as error:
        raise ExportError(f"--model {model_dir}: {error}") from None
    model = load_model(model_dir).eval()
    generation = read_generation_settings(model_dir)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    context = gguf_context(model.config, architecture)

    # Hidden names in the same folder, so the renames are atomic and an interrupted export leaves no .gguf behind.
    partial = gguf_path.with_name(f".{gguf_path.name}.partial-{os.getpid()}")
    partial_modelfile = modelfile_path.with_name(f".{modelfile_path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, arch=architecture)
    try:
        name = Path(model_dir).resolve().name
        add_hyperparameters(writer, model.config, architecture, name, int(file_type), generation)
        add_tokenizer(writer, tokenizer, Path(model_dir), int(model.config.vocab_size))
        tensors = add_tensors(writer, model, architecture, outtype)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))  # "124M", as the converter writes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial_modelfile.write_text(
            tokenizer_modelfile(gguf_path.name, tokenizer, context, generation), encoding="utf-8"
        )
        os.replace(partial, gguf_path)
        os.replace(partial_modelfile, modelfile_path)
    except BaseException:
        writer.close()
        for path in (partial, partial_modelfile):
            path.unlink(missing_ok=True)
        raise
    return ExportResult(
        gguf_path=gguf_path,
        modelfile_path=modelfile_path,
        outtype=outtype,
        size_bytes=gguf_path.stat().st_size,
        tensors=tensors,
        seconds=time.perf_counter() - start,
        architecture=architecture,
    )


def export_for_notebook(
    model_dir: str | Path, enabled: bool, outtype: str = DEFAULT_OUTTYPE, download: bool | None = None
) -> ExportResult | None:
    """The notebook's export cell, if `enabled` (off by default, like the Hub upload): export (replacing an earlier
    export of this run), print what was written and the Ollama lines, and on Colab offer both files for download
    (`download=None` means "when in Colab").

    Returns:
        What was written, or None when not enabled.
    """
    if not enabled:
        print("export_gguf is False: no GGUF file was written.")
        return None
    result = export_gguf(model_dir, outtype, overwrite=True)
    print(f"{result.gguf_path} ({result.size_bytes / 2**20:.1f} MiB, {result.tensors} tensors, {result.seconds:.1f} s)")
    print(result.modelfile_path)
    print(f"ollama create gpt2ft -f {result.modelfile_path.name} && ollama run gpt2ft")
    if download if download is not None else in_colab():
        from google.colab import files  # type: ignore[import-not-found]

        files.download(str(result.gguf_path))
        files.download(str(result.modelfile_path))
    return result
