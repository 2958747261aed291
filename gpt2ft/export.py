"""Export a fine-tuned model to GGUF, to run it where Python is not: llama.cpp, Ollama, LM Studio.

    python -m gpt2ft export --model gpt2_finetuned                      # gpt2_finetuned-f16.gguf + .Modelfile
    python -m gpt2ft export --model gpt2_finetuned --outtype q8_0 --output chat.gguf
    ollama create gpt2ft -f gpt2_finetuned-f16.Modelfile && ollama run gpt2ft

The `gguf` package (llama.cpp's own Python library, from PyPI) does the work: GGUFWriter writes the file,
TensorNameMap gives llama.cpp's names for GPT-2's tensors, gguf.quants does q8_0, SpecialVocab reads the BPE merges.
What is gpt2ft's own is small, and follows llama.cpp's GPT-2 converter (`convert_hf_to_gguf.py`, GPT2Model):

- GPT-2's Conv1D stores its weights (in, out), transposed relative to nn.Linear's (out, in), which is the layout
  llama.cpp reads; they are transposed on the way out.
- The output layer is tied to the token embedding, so only the embedding is written (llama.cpp reuses it).
- 1-D tensors (biases, layer norms) and the position embedding stay f32 in every outtype, as the converter keeps them.
- The chat template is the model's own (gpt2ft's training format), without its `{% generation %}` markers, which only
  transformers understands; it renders the same string (tests/test_export.py checks both, through llama.cpp too).

Beside the GGUF goes an Ollama Modelfile: the same format as an Ollama (Go) template, `<|endoftext|>` as the stop,
and the sampling defaults of the model's generation_config.json. A LoRA run's folder holds the merged model, so it
exports like a full run. Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
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
# llama.cpp's name for the GPT-2 pre-tokenizer (the regex that splits text before byte-level BPE).
GPT2_PRE_TOKENIZER = "gpt-2"
# ggml's GELU is the tanh approximation (transformers' gelu_new); exact GELU differs from it by < 1e-3.
GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# Buffers of older checkpoints (the causal mask), not weights.
SKIPPED_TENSORS = (".attn.bias", ".attn.masked_bias")
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


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


# --------------------------------------------------------------------------------------------------------------
# Config, paths and checks
# --------------------------------------------------------------------------------------------------------------


def add_n_ctx(config: Any) -> Any:
    """Give a GPT-2 config `n_ctx` (= `n_positions`), the key llama.cpp's own converter reads for the context length.

    transformers dropped `n_ctx` from GPT2Config, so folders saved by it lack the key and `convert_hf_to_gguf.py`
    stops with `KeyError: 'n_ctx'`. Set it before `save_pretrained`: config.json keeps it and AutoConfig loads it
    back as a plain attribute. Returns the config.
    """
    from .modeling import config_context

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
        ModelError: not a local GPT-2 folder with safetensors weights and a tokenizer.
    """
    from .modeling import ModelError, check_model_source

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


def check_gguf_compatible(config: Any, model_dir: str) -> None:
    """Refuse a GPT-2 variant whose computation llama.cpp's GPT-2 graph does not reproduce.

    Raises:
        ExportError: a non-GELU activation, unscaled or layer-scaled attention, or cross-attention.
    """
    problems = []
    activation = getattr(config, "activation_function", "gelu_new")
    if activation not in GELU_ACTIVATIONS:
        problems.append(f"activation_function {activation!r} (llama.cpp's GPT-2 uses GELU)")
    if not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights false")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if getattr(config, "add_cross_attention", False):
        problems.append("cross-attention layers")
    if problems:
        raise ExportError(f"--model {model_dir}: llama.cpp's GPT-2 cannot run this model: {'; '.join(problems)}")


# --------------------------------------------------------------------------------------------------------------
# Building the GGUF
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


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token of the vocabulary in id order (byte-level strings, as in vocab.json) with its GGUF token type:
    CONTROL for special tokens (`<|endoftext|>`), USER_DEFINED for other added tokens, NORMAL for the BPE vocabulary.
    Ids the tokenizer does not use (a vocabulary padded in the config) become `[PAD<id>]`, as llama.cpp's converter
    writes them.

    Raises:
        ExportError: the tokenizer is not a byte-level BPE (GPT-2's).
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    if (state.get("model") or {}).get("type") != "BPE" or (state.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ExportError("the tokenizer is not GPT-2's byte-level BPE, which is what llama.cpp's GPT-2 expects")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, [int(kind) for kind in types]


def add_tokenizer(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int) -> None:
    """Tokens, merges, special ids and the chat template, the way llama.cpp reads a GPT-2 vocabulary.

    BOS and EOS are both `<|endoftext|>`; the tokenizer adds neither (the template writes every EOS itself, so a
    prompt starts with exactly one).
    """
    import gguf

    tokens, types = vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"--model {model_dir}: no BPE merges in tokenizer.json or merges.txt")
    # Ids from the loaded tokenizer, not only from files: GPT-2 has no pad token and gpt2ft pads with EOS.
    special.special_token_ids = {
        kind: int(token_id)
        for kind, token_id in (
            ("bos", tokenizer.bos_token_id),
            ("eos", tokenizer.eos_token_id),
            ("unk", tokenizer.unk_token_id),
            ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    special.add_special_token = {"bos": False, "eos": False}
    special.chat_template = gguf_chat_template(getattr(tokenizer, "chat_template", None))
    special.add_to_gguf(writer, quiet=True)


def add_hyperparameters(writer: Any, config: Any, name: str, file_type: int, generation: dict[str, Any]) -> None:
    """GPT-2's shape and norm epsilon under llama.cpp's `gpt2.*` keys, plus the name and sampling defaults."""
    import gguf

    from .modeling import config_context

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config_context(config))
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
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


def add_tensors(writer: Any, model: Any, outtype: str) -> int:
    """Queue every weight under its llama.cpp name, converted lazily: each tensor is cast or quantised only when the
    writer reaches it, so a gpt2-xl export needs the model's memory plus one tensor, not a second copy.

    Returns:
        The number of tensors written.
    """
    import gguf
    import torch
    from transformers.pytorch_utils import Conv1D

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    count = 0
    for name, parameter in model.state_dict().items():
        if name.endswith(SKIPPED_TENSORS) or (tied and name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"weight {name!r} has no llama.cpp GPT-2 name: not a plain GPT-2 model")
        data = parameter.detach().to(torch.float32)
        if name.endswith(CONV1D_WEIGHTS) and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D):
            data = data.t()
        array = gguf.LazyNumpyTensor.from_eager(data.numpy())
        qtype = tensor_type(gguf_name, array, outtype)
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        count += 1
    return count


def build_modelfile(gguf_name: str, eos_token: str, context: int, generation: dict[str, Any]) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (in the same folder).

    The TEMPLATE is the training format as an Ollama (Go) template: EOS, then every message followed by EOS, with no
    role names (a system message is a first turn, as in gpt2ft.chat_format). Ollama has no `trim`, so messages are
    used as typed. The stop is EOS. repeat_penalty 1 turns off Ollama's default penalty, which would also penalise
    the EOS tokens of the prompt and keep the model from ending its turn (gpt2ft.generate sets none for the same
    reason); num_ctx is GPT-2's context, past which it has no position embeddings.
    """
    lines = [
        "# Ollama Modelfile written by `python -m gpt2ft export`:",
        f"#   ollama create gpt2ft -f {Path(gguf_name).with_suffix('.Modelfile').name}",
        "#   ollama run gpt2ft",
        f"FROM ./{gguf_name}",
        "",
        "# The training format: EOS, then every turn followed by EOS, no role names.",
        f'TEMPLATE """{eos_token}{{{{ range .Messages }}}}{{{{ .Content }}}}{eos_token}{{{{ end }}}}"""',
        "",
        f'PARAMETER stop "{eos_token}"',
        f"PARAMETER num_ctx {context}",
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


def export_gguf(
    model_dir: str | Path, outtype: str = DEFAULT_OUTTYPE, output: str | Path | None = None, overwrite: bool = False
) -> ExportResult:
    """Write the model in `model_dir` as one GGUF file (weights, hyperparameters, tokenizer, chat template) with an
    Ollama Modelfile beside it.

    Args:
        model_dir: a folder written by `train` (a LoRA run's folder holds the merged model), or any GPT-2
            save_pretrained folder with safetensors weights and a tokenizer.
        outtype: f32 (exact), f16 (half the size) or q8_0 (8-bit blocks, about a quarter of f32).
        output: the GGUF path; default `<folder name>-<outtype>.gguf` beside the folder.
        overwrite: replace existing output files.

    Raises:
        ExportError, ModelError: bad arguments or model (checked before anything is written; nothing is left behind).
    """
    import gguf

    from .modeling import config_context, load_model_and_tokenizer

    start = time.perf_counter()
    model_dir = str(model_dir)
    gguf_path, modelfile_path = output_paths(model_dir, outtype, output)
    check_export_request(model_dir, outtype, gguf_path, modelfile_path, overwrite)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    check_gguf_compatible(model.config, model_dir)
    generation = read_generation_settings(model_dir)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]

    # Hidden names in the same folder, so the renames are atomic and an interrupted export leaves no .gguf behind.
    partial = gguf_path.with_name(f".{gguf_path.name}.partial-{os.getpid()}")
    partial_modelfile = modelfile_path.with_name(f".{modelfile_path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(partial, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    try:
        add_hyperparameters(writer, model.config, Path(model_dir).resolve().name, int(file_type), generation)
        add_tokenizer(writer, tokenizer, Path(model_dir), int(model.config.vocab_size))
        tensors = add_tensors(writer, model, outtype)
        writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))  # "124M", as the converter writes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial_modelfile.write_text(
            build_modelfile(gguf_path.name, tokenizer.eos_token, config_context(model.config), generation),
            encoding="utf-8",
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
