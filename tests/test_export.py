"""GGUF export (gpt2ft/export.py): the file's contents read back with the gguf package, for GPT-2 and the tiny
Llama, Qwen2, Qwen3 and Mistral of conftest.FAMILY_CONFIGS; the Modelfile, bad input, a LoRA run, and (marked slow)
the exported files run through llama.cpp itself, via llama-cpp-python.

    python -m pytest tests/test_export.py -q                 # the llama.cpp tests skip when llama_cpp is missing
    python -m pytest tests/test_export.py -q -m slow         # only the llama.cpp tests

The llama.cpp greedy tests use tiny models trained here (a few seconds of CPU each) on the fixture's question ->
answer exchanges in their chat format (gpt2ft's for GPT-2, ChatML for Llama and Qwen2), so greedy replies are real
sentences that end at the end-of-turn token rather than noise. The logits tests use random-init models whose query
and key weights are scaled up, so attention (and with it the rope layout) visibly shapes the logits.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import (
    CHATML_WITH_SYSTEM,
    EXCHANGES,
    FAMILY_CONFIGS,
    build_chatml_tokenizer,
    build_tiny_family_dir,
    build_tiny_model_dir,
    train_argv,
)

from gpt2ft import cli
from gpt2ft.chat_format import CHAT_TEMPLATE, as_messages, render_ids
from gpt2ft.export import (
    ExportError,
    add_n_ctx,
    build_modelfile,
    export_for_notebook,
    export_gguf,
    gguf_chat_template,
    gguf_context,
    ollama_template,
    output_paths,
    pre_tokenizer_name,
)
from gpt2ft.modeling import load_model, load_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " Hello , how are you ? "},
    {"role": "assistant", "content": "I am fine , thanks ."},
    {"role": "user", "content": "What time is it ?"},
]


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def field(reader, key):
    return reader.fields[key].contents()


def tensor(reader, name):
    """A tensor as stored, in numpy's (rows, columns) order (GGUF lists shapes the other way round)."""
    found = [t for t in reader.tensors if t.name == name]
    assert found, f"no tensor {name}"
    return found[0]


def hf_render(tokenizer, messages) -> str:
    """The prompt transformers renders, with the model's template (gpt2ft's when it has none, as in the fixture)."""
    template = tokenizer.chat_template or CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def jinja_render(template: str, tokenizer, messages) -> str:
    """Render as llama-cpp-python's Jinja2ChatFormatter and transformers do: a sandbox with trim/lstrip blocks."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(
        messages=messages, eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token, add_generation_prompt=True
    )


# --------------------------------------------------------------------------------------------------------------
# n_ctx, the chat template, paths
# --------------------------------------------------------------------------------------------------------------


def test_add_n_ctx_is_saved_and_loads_back(tmp_path):
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=96, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    assert add_n_ctx(config) is config
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["n_ctx"] == saved["n_positions"] == 96  # what llama.cpp's convert_hf_to_gguf.py reads
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "gpt2" and loaded.n_positions == 96 and loaded.n_ctx == 96


def test_gguf_template_drops_generation_markers_and_renders_the_same(tiny_tokenizer):
    template = gguf_chat_template(CHAT_TEMPLATE)
    assert "generation" not in template and "generation" in CHAT_TEMPLATE
    expected = hf_render(tiny_tokenizer, MESSAGES)
    assert expected == (
        "<|endoftext|>Be brief.<|endoftext|>Hello , how are you ?<|endoftext|>I am fine , thanks .<|endoftext|>"
        "What time is it ?<|endoftext|>"
    )
    assert jinja_render(template, tiny_tokenizer, MESSAGES) == expected
    assert gguf_chat_template(None) == template  # models saved before templates get gpt2ft's


def test_default_output_is_beside_the_model_folder(tmp_path):
    gguf_path, modelfile = output_paths(tmp_path / "run" / "gpt2_finetuned", "q8_0")
    assert gguf_path == (tmp_path / "run" / "gpt2_finetuned-q8_0.gguf").resolve()
    assert modelfile == gguf_path.with_name("gpt2_finetuned-q8_0.Modelfile")
    assert output_paths("m", "f16", tmp_path / "x.gguf") == (tmp_path / "x.gguf", tmp_path / "x.Modelfile")


# --------------------------------------------------------------------------------------------------------------
# The GGUF file, read back
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_export(tiny_model_dir, tmp_path_factory):
    folder = copy_model(tiny_model_dir, tmp_path_factory.mktemp("export") / "tiny")
    return export_gguf(folder, "f32"), folder


def test_f32_export_holds_weights_hyperparameters_and_tokenizer(f32_export, tiny_tokenizer):
    result, folder = f32_export
    model = load_model(str(folder))
    config = model.config
    reader = gguf.GGUFReader(result.gguf_path)
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == config.n_positions == 256
    assert field(reader, "gpt2.block_count") == config.n_layer
    assert field(reader, "gpt2.embedding_length") == config.n_embd
    assert field(reader, "gpt2.feed_forward_length") == 4 * config.n_embd
    assert field(reader, "gpt2.attention.head_count") == config.n_head
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "general.size_label") == f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}K"

    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size == len(tiny_tokenizer)
    assert tokens == tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    eos = tiny_tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.token_type")[eos] == gguf.TokenType.CONTROL
    assert field(reader, "tokenizer.ggml.token_type")[eos + 1] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    for key in ("bos", "eos", "padding"):
        assert field(reader, f"tokenizer.ggml.{key}_token_id") == eos
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    template = field(reader, "tokenizer.chat_template")
    assert jinja_render(template, tiny_tokenizer, MESSAGES) == hf_render(tiny_tokenizer, MESSAGES)

    # 4 + 12 per block; the output layer is the (tied) token embedding, written once.
    assert result.tensors == len(reader.tensors) == 4 + 12 * config.n_layer
    weights = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    np.testing.assert_array_equal(tensor(reader, "token_embd.weight").data, weights["transformer.wte.weight"])
    np.testing.assert_array_equal(tensor(reader, "position_embd.weight").data, weights["transformer.wpe.weight"])
    # Conv1D (in, out) weights go out as nn.Linear's (out, in).
    qkv = tensor(reader, "blk.1.attn_qkv.weight")
    assert list(qkv.shape) == [config.n_embd, 3 * config.n_embd]  # ggml order: (in, out)
    np.testing.assert_array_equal(qkv.data, weights["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(
        tensor(reader, "blk.0.ffn_down.weight").data, weights["transformer.h.0.mlp.c_proj.weight"].T
    )
    np.testing.assert_array_equal(tensor(reader, "output_norm.bias").data, weights["transformer.ln_f.bias"])
    assert not [t.name for t in reader.tensors if t.name.startswith("output.")]


def test_f16_and_q8_0_store_matrices_smaller_and_keep_vectors_f32(f32_export):
    result_f32, folder = f32_export
    weights = load_model(str(folder)).state_dict()
    sizes = {"f32": result_f32.size_bytes}
    for outtype, matrix_type in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        result = export_gguf(folder, outtype)
        sizes[outtype] = result.size_bytes
        reader = gguf.GGUFReader(result.gguf_path)
        assert field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[outtype]
        for item in reader.tensors:
            if len(item.shape) == 1 or item.name == "position_embd.weight":
                assert item.tensor_type == gguf.GGMLQuantizationType.F32, item.name
            else:
                assert item.tensor_type == matrix_type, item.name
        qkv = tensor(reader, "blk.0.attn_qkv.weight")
        restored = gguf.quants.dequantize(qkv.data, qkv.tensor_type)
        original = weights["transformer.h.0.attn.c_attn.weight"].numpy().T
        error = np.abs(restored - original).max()
        assert 0 < error < 0.01 * np.abs(original).max(), (outtype, error)
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_modelfile_carries_template_stop_and_saved_sampling(f32_export):
    result, _ = f32_export
    text = result.modelfile_path.read_text()
    assert f"FROM ./{result.gguf_path.name}\n" in text
    assert 'TEMPLATE """<|endoftext|>{{ range .Messages }}{{ .Content }}<|endoftext|>{{ end }}"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and "PARAMETER num_ctx 256" in text
    assert "PARAMETER temperature 0\n" in text  # the tiny fixture saved no sampling: greedy

    from gpt2ft.generate import GENERATION_DEFAULTS

    sampled = build_modelfile("m-f16.gguf", "<|endoftext|>", 1024, dict(GENERATION_DEFAULTS))
    for line in (
        "PARAMETER temperature 0.8",
        "PARAMETER top_p 0.9",
        "PARAMETER top_k 0",
        "PARAMETER num_predict 50",
        "PARAMETER repeat_penalty 1.0",
        "PARAMETER num_ctx 1024",
    ):
        assert line + "\n" in sampled


def test_sampling_defaults_come_from_generation_config(tiny_model_dir, tiny_tokenizer, tmp_path):
    from gpt2ft.generate import build_generation_config

    folder = copy_model(tiny_model_dir, tmp_path / "tuned")
    build_generation_config(tiny_tokenizer, temperature=0.7, top_p=0.95).save_pretrained(folder)
    result = export_gguf(folder, "q8_0")
    text = result.modelfile_path.read_text()
    assert "PARAMETER temperature 0.7\n" in text and "PARAMETER top_p 0.95\n" in text
    reader = gguf.GGUFReader(result.gguf_path)
    assert field(reader, "general.sampling.temp") == pytest.approx(0.7)
    assert field(reader, "general.sampling.top_p") == pytest.approx(0.95)


# --------------------------------------------------------------------------------------------------------------
# The Llama-style families (tiny Llama, Qwen2, Qwen3, Mistral with a ChatML tokenizer), read back
# --------------------------------------------------------------------------------------------------------------

ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SMOLLM2 = Path("/work/models/smollm2/hf")


def rope_interleaved(weights: np.ndarray, heads: int) -> np.ndarray:
    """A q/k projection's rows as llama.cpp's `llama` rotates them: row 2i + c of each head is transformers' row
    c * head_dim / 2 + i (transformers rotates the halves of a head, llama.cpp adjacent pairs)."""
    size = weights.shape[0] // heads
    order = [head * size + (row % 2) * (size // 2) + row // 2 for head in range(heads) for row in range(size)]
    return weights[order]


@pytest.fixture(scope="module", params=list(ARCHITECTURE))
def family_export(request, tmp_path_factory):
    """(family, folder, f32 export) of a tiny random-init model of each Llama-style family."""
    folder = build_tiny_family_dir(tmp_path_factory.mktemp(f"export_{request.param}") / request.param, request.param)
    return request.param, folder, export_gguf(folder, "f32")


def test_family_export_holds_hyperparameters_tokenizer_and_template(family_export):
    family, folder, result = family_export
    tokenizer, config = load_tokenizer(str(folder)), load_model(str(folder)).config
    reader = gguf.GGUFReader(result.gguf_path)
    arch = ARCHITECTURE[family]
    assert result.architecture == field(reader, "general.architecture") == arch
    expected = {
        "context_length": 512,
        "block_count": 2,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 16,
        "attention.value_length": 16,
        "rope.dimension_count": 16,
        "vocab_size": len(tokenizer),
    }
    assert {key: field(reader, f"{arch}.{key}") for key in expected} == expected
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert f"{arch}.rope.scaling.type" not in reader.fields

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    # The tiny tokenizer's ByteLevel regex is GPT-2's; transformers loads a Qwen2 folder's with Qwen2's own split
    # (Qwen2Tokenizer), and the file follows what transformers tokenises with.
    assert field(reader, "tokenizer.ggml.pre") == ("qwen2" if family == "qwen2" else "gpt-2")
    assert field(reader, "tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = field(reader, "tokenizer.ggml.token_type")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokenizer.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL, special
    assert types[tokenizer.convert_tokens_to_ids("user")] == gguf.TokenType.NORMAL
    ids = {key: field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")}
    assert ids == {
        "bos": tokenizer.convert_tokens_to_ids("<|im_start|>"),
        "eos": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "padding": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "unknown": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the tokenizer adds no BOS itself
    assert "tokenizer.ggml.eot_token_id" not in reader.fields  # ChatML's end of turn is EOS here
    template = field(reader, "tokenizer.chat_template")
    assert template == tokenizer.chat_template
    assert jinja_render(template, tokenizer, MESSAGES) == hf_render(tokenizer, MESSAGES)


def test_family_export_holds_every_weight_in_llama_cpp_layout(family_export):
    family, folder, result = family_export
    model = load_model(str(folder))
    config = model.config
    weights = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    reader = gguf.GGUFReader(result.gguf_path)
    block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    block = [f"{name}.weight" for name in block]
    if family == "qwen2":
        block += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
    if family == "qwen3":
        block += ["attn_q_norm.weight", "attn_k_norm.weight"]
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{name}" for i in range(2) for name in block}
    if not config.tie_word_embeddings:  # Qwen2 and Mistral here; tied Llama and Qwen3 reuse the token embedding
        expected.add("output.weight")
    assert {item.name for item in reader.tensors} == expected and result.tensors == len(expected)

    np.testing.assert_array_equal(tensor(reader, "token_embd.weight").data, weights["model.embed_tokens.weight"])
    if "output.weight" in expected:
        np.testing.assert_array_equal(tensor(reader, "output.weight").data, weights["lm_head.weight"])
    attention = "model.layers.1.self_attn"
    q, k = weights[f"{attention}.q_proj.weight"], weights[f"{attention}.k_proj.weight"]
    if ARCHITECTURE[family] == "llama":  # rope on adjacent pairs: rows permuted (the converter's LlamaModel.permute)
        q, k = rope_interleaved(q, 4), rope_interleaved(k, 2)
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_q.weight").data, q)
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_k.weight").data, k)
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_v.weight").data, weights[f"{attention}.v_proj.weight"])
    assert list(tensor(reader, "blk.1.attn_k.weight").shape) == [64, 2 * 16]  # ggml order: (in, out)
    if family == "qwen2":  # NEOX rope: biases as they are
        np.testing.assert_array_equal(tensor(reader, "blk.1.attn_q.bias").data, weights[f"{attention}.q_proj.bias"])
    if family == "qwen3":
        np.testing.assert_array_equal(
            tensor(reader, "blk.1.attn_k_norm.weight").data, weights[f"{attention}.k_norm.weight"]
        )
    np.testing.assert_array_equal(
        tensor(reader, "blk.0.ffn_down.weight").data, weights["model.layers.0.mlp.down_proj.weight"]
    )


def test_family_q8_0_quantises_matrices_and_keeps_vectors_f32(family_export, tmp_path):
    family, folder, _ = family_export
    result = export_gguf(folder, "q8_0", output=tmp_path / "q.gguf")
    reader = gguf.GGUFReader(result.gguf_path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for item in reader.tensors:
        expected = gguf.GGMLQuantizationType.F32 if len(item.shape) == 1 else gguf.GGMLQuantizationType.Q8_0
        assert item.tensor_type == expected, item.name


def test_family_modelfile_writes_chatml_and_stops_at_im_end(family_export):
    family, folder, result = family_export
    text = result.modelfile_path.read_text()
    turns = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    if FAMILY_CONFIGS[family][2] == CHATML_WITH_SYSTEM:  # SmolLM2's shape: a system turn when the chat has none
        turns = (
            '{{- if and .Messages (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
            "You are a helpful AI assistant.<|im_end|>\n{{ end }}" + turns
        )
    assert f'\nTEMPLATE """{turns}"""\n' in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER num_ctx 512\n" in text


def test_modelfile_template_is_left_to_ollama_for_other_formats_and_context_is_capped(tmp_path):
    tokenizer = build_chatml_tokenizer(tmp_path / "tok")
    tokenizer.chat_template = (  # Llama 3's shape: not ChatML
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    )
    template, comment = ollama_template(tokenizer)
    assert template is None and "Ollama takes the chat format from the GGUF" in comment
    text = build_modelfile("m.gguf", "<|eot_id|>", 131072, {}, template, comment)
    assert 'TEMPLATE """' not in text and 'PARAMETER stop "<|eot_id|>"' in text and "PARAMETER num_ctx 8192\n" in text


def test_mistral_context_is_capped_at_its_sliding_window():
    from transformers import MistralConfig, Qwen2Config

    assert gguf_context(MistralConfig(max_position_embeddings=512, sliding_window=128), "llama") == 128
    assert gguf_context(MistralConfig(max_position_embeddings=512, sliding_window=None), "llama") == 512
    assert gguf_context(Qwen2Config(max_position_embeddings=512, sliding_window=128), "qwen2") == 512  # not used


def with_pre_tokenizer(tokenizer, pre_tokenizer):
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")


def test_pre_tokenizer_name_follows_the_tokenizer_config(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    from gpt2ft.export import LLAMA3_SPLIT, QWEN2_SPLIT

    tokenizer = build_chatml_tokenizer(tmp_path / "tok")
    assert pre_tokenizer_name(tokenizer) == "gpt-2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for split, name in ((LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")):
        step = pre_tokenizers.Split(Regex(split), behavior="isolated")
        assert pre_tokenizer_name(with_pre_tokenizer(tokenizer, pre_tokenizers.Sequence([step, byte_level]))) == name
    digits = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert pre_tokenizer_name(with_pre_tokenizer(tokenizer, digits)) == "smollm"
    with pytest.raises(ExportError, match="pre-tokenizer"):  # llama.cpp adds no prefix space
        pre_tokenizer_name(with_pre_tokenizer(tokenizer, pre_tokenizers.ByteLevel(add_prefix_space=True)))
    with pytest.raises(ExportError, match="pre-tokenizer"):
        pre_tokenizer_name(with_pre_tokenizer(tokenizer, pre_tokenizers.Whitespace()))


def test_smollm2_tokenizer_gets_the_converters_name():
    """SmolLM2's tokenizer.json (as transformers 5 saves it) holds ByteLevel alone; the converter's hash of its check
    text names it `smollm`, whose digit split is the same here (the vocabulary merges no digits)."""
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"{SMOLLM2} is not present")
    assert pre_tokenizer_name(load_tokenizer(str(SMOLLM2))) == "smollm"


# --------------------------------------------------------------------------------------------------------------
# The command line and bad input
# --------------------------------------------------------------------------------------------------------------


def test_cli_export_writes_beside_the_model_and_prints_paths(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "my_model")
    assert cli.main(["export", "--model", str(folder), "--format", "gguf"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = tmp_path / "my_model-f16.gguf"
    assert out[:2] == [str(expected), str(tmp_path / "my_model-f16.Modelfile")]
    assert gguf.GGUFReader(expected).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "my_model",
        "my_model-f16.Modelfile",
        "my_model-f16.gguf",
    ]


def test_notebook_export_is_opt_in_and_replaces_an_earlier_export(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "gpt2_finetuned")
    assert export_for_notebook(folder, enabled=False) is None
    assert "export_gguf is False" in capsys.readouterr().out and sorted(tmp_path.iterdir()) == [folder]
    first = export_for_notebook(folder, enabled=True, outtype="q8_0", download=False)
    again = export_for_notebook(folder, enabled=True, outtype="q8_0", download=False)  # a re-run of the cell
    assert again.gguf_path == first.gguf_path == tmp_path / "gpt2_finetuned-q8_0.gguf"
    out = capsys.readouterr().out
    assert "ollama create gpt2ft -f gpt2_finetuned-q8_0.Modelfile" in out and str(first.gguf_path) in out


def one_line_exit_2(argv, capsys, *fragments):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_parser_choices_match_the_export_module():
    from gpt2ft.export import DEFAULT_OUTTYPE, FORMATS, OUTTYPES

    export = cli.build_parser()._subparsers._group_actions[0].choices["export"]
    flags = {action.dest: action for action in export._actions}
    assert tuple(flags["outtype"].choices) == OUTTYPES and flags["outtype"].default == DEFAULT_OUTTYPE
    assert tuple(flags["format"].choices) == FORMATS


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    target = tmp_path / "out.gguf"
    target.write_bytes(b"keep me")
    one_line_exit_2(["export", "--model", str(folder), "--output", str(target)], capsys, str(target), "--overwrite")
    assert target.read_bytes() == b"keep me" and not (tmp_path / "out.Modelfile").exists()
    assert cli.main(["export", "--model", str(folder), "--output", str(target), "--overwrite", "--outtype", "f32"]) == 0
    assert target.read_bytes()[:4] == b"GGUF"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    one_line_exit_2(["export", "--model", str(folder), "--outtype", "q4_k"], capsys, "--outtype", "q4_k")
    one_line_exit_2(["export", "--model", str(folder), "--format", "onnx"], capsys, "--format")
    one_line_exit_2(["export", "--model", str(tmp_path / "nowhere")], capsys, "nowhere", "no such model folder")
    one_line_exit_2(["export", "--model", str(folder), "--output", str(tmp_path / "x.bin")], capsys, ".gguf")
    one_line_exit_2(
        ["export", "--model", str(folder), "--output", str(tmp_path / "no" / "x.gguf")], capsys, "does not exist"
    )

    gemma = copy_model(tiny_model_dir, tmp_path / "gemma")
    config = json.loads((gemma / "config.json").read_text())
    (gemma / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    one_line_exit_2(["export", "--model", str(gemma)], capsys, "model_type 'gemma'")

    no_tokenizer = copy_model(tiny_model_dir, tmp_path / "no_tok")
    for name in ("tokenizer.json", "vocab.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    one_line_exit_2(["export", "--model", str(no_tokenizer)], capsys, "no tokenizer files")

    relu = copy_model(tiny_model_dir, tmp_path / "relu")
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    one_line_exit_2(["export", "--model", str(relu)], capsys, "activation_function 'relu'")

    assert (
        not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*Modelfile*")) and not list(tmp_path.glob(".*"))
    )


def edited_copy(source: Path, folder: Path, **changes) -> Path:
    copy_model(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_what_llama_cpp_would_run_differently_is_refused(tiny_llama_dir, tiny_qwen2_dir, tmp_path, capsys):
    cases = [
        (edited_copy(tiny_llama_dir, tmp_path / "gelu", hidden_act="gelu"), "hidden_act 'gelu'"),
        (
            edited_copy(
                tiny_llama_dir,
                tmp_path / "yarn",
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
            ),
            "rope_type 'yarn'",
        ),
        (
            edited_copy(tiny_qwen2_dir, tmp_path / "swa", use_sliding_window=True, sliding_window=64),
            "sliding-window attention",
        ),
    ]
    for folder, fragment in cases:
        one_line_exit_2(["export", "--model", str(folder)], capsys, fragment, "llama.cpp's")

    prefixed = copy_model(tiny_llama_dir, tmp_path / "prefix")
    state = json.loads((prefixed / "tokenizer.json").read_text())
    state["pre_tokenizer"]["add_prefix_space"] = True
    (prefixed / "tokenizer.json").write_text(json.dumps(state))
    one_line_exit_2(["export", "--model", str(prefixed)], capsys, "pre-tokenizer", str(prefixed))

    metaspace = copy_model(tiny_llama_dir, tmp_path / "metaspace")
    state["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (metaspace / "tokenizer.json").write_text(json.dumps(state))
    one_line_exit_2(["export", "--model", str(metaspace)], capsys, "not a byte-level BPE")
    assert (
        not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*Modelfile*")) and not list(tmp_path.glob(".*"))
    )


def test_a_failed_write_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    folder = copy_model(tiny_model_dir, tmp_path / "m")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_gguf(folder, "f16")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m"]


# --------------------------------------------------------------------------------------------------------------
# A LoRA run exports its merged model
# --------------------------------------------------------------------------------------------------------------


def test_lora_run_exports_the_merged_model(tiny_model_dir, dailydialog_dir, run_dirs, capsys):
    argv = train_argv(
        tiny_model_dir,
        dailydialog_dir,
        run_dirs,
        "--method",
        "lora",
        "--lora-r",
        "4",
        "--max-steps",
        "3",
        "--learning-rate",
        "5e-2",
    )
    assert cli.main(argv) == 0
    capsys.readouterr()  # training's own output
    run = Path(run_dirs["output"])
    one_line_exit_2(["export", "--model", str(run / "adapter")], capsys, "LoRA adapter", str(run.resolve()))
    assert cli.main(["export", "--model", str(run), "--outtype", "f32"]) == 0
    reader = gguf.GGUFReader(run.parent / f"{run.name}-f32.gguf")
    merged = load_model(str(run)).state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()
    base = load_model(str(tiny_model_dir)).state_dict()["transformer.h.0.attn.c_attn.weight"].numpy()
    exported = tensor(reader, "blk.0.attn_qkv.weight").data
    np.testing.assert_array_equal(exported, merged.T)
    assert np.abs(exported - base.T).max() > 1e-3, "the adapters' update is missing"


# --------------------------------------------------------------------------------------------------------------
# llama.cpp runs the exported files (slow: needs llama-cpp-python, built from source)
# --------------------------------------------------------------------------------------------------------------


def llama_cpp_importable() -> bool:
    try:
        import llama_cpp  # noqa: F401  (loads the compiled library too)
    except Exception:
        return False
    return True


# A skipif mark, not importorskip in the test: it skips before the module's fixtures train a model for nothing.
needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_importable(), reason="llama_cpp (pip install llama-cpp-python) cannot be imported"
)
QUESTIONS = [question for question, _ in EXCHANGES]
UNSEEN = ["Hi, how are you?", "Do you like coffee ?"]
MAX_NEW_TOKENS = 24


def train_dialog_model(folder: Path, steps: int = 300, learning_rate: float = 3e-3) -> Path:
    """Train the tiny model in `folder` in place on the fixture's exchanges in its chat template (gpt2ft's format:
    EOS, question, EOS, answer, EOS; ChatML: the question's turn, the assistant's header, the answer, <|im_end|>),
    loss on the answers, with a plain loop: 300 full-batch AdamW steps (100 at 1e-2 for the 64-wide Llama-style
    models) take the loss near zero, so greedy decoding answers each question and then writes the end-of-turn
    token."""
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder))
    rows, targets = [], []
    for question, answer in EXCHANGES:
        prompt = render_ids(tokenizer, [{"role": "user", "content": question}])
        exchange = as_messages([question, answer], roles=["user", "assistant"])
        row = list(
            tokenizer.apply_chat_template(
                exchange, chat_template=tokenizer.chat_template, tokenize=True, return_dict=False
            )
        )
        assert row[: len(prompt)] == prompt, "the prompt is not where the conversation starts"
        rows.append(row)
        targets.append([-100] * len(prompt) + row[len(prompt) :])  # the answer and its end of turn: what to predict
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in targets])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    # `steps`, then up to twice as many more while the loss is not yet near zero: CPUs differ in their float paths
    # (the Llama-style model ended at 0.099 after 100 steps on one machine, below 0.05 on another).
    for step in range(3 * steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        if step >= steps and loss.item() < 0.05:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the tiny model did not learn the exchanges (loss {loss.item():.3f})"
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    return train_dialog_model(build_tiny_model_dir(tmp_path_factory.mktemp("trained") / "dialog"))


def transformers_greedy(model, tokenizer, prompt_ids: list[int]) -> list[int]:
    """Greedy tokens after the prompt, up to and including EOS."""
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return output[0, len(prompt_ids) :].tolist()


def llama_greedy(llm, prompt_ids: list[int], eos: int) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if token == eos or len(tokens) == MAX_NEW_TOKENS:
            break
    return tokens


def load_llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=64, seed=0, verbose=False)


@pytest.fixture(scope="module")
def greedy_reference(trained_dir):
    """Prompt ids (question rendered by the chat template) -> transformers' greedy reply tokens."""
    tokenizer = load_tokenizer(str(trained_dir))
    model = load_model(str(trained_dir)).eval()
    prompts = [render_ids(tokenizer, as_messages([question])) for question in QUESTIONS + UNSEEN]
    return tokenizer, [(prompt, transformers_greedy(model, tokenizer, prompt)) for prompt in prompts]


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_f32_greedy_equals_transformers(trained_dir, greedy_reference):
    tokenizer, reference = greedy_reference
    eos = tokenizer.eos_token_id
    llm = load_llama(export_gguf(trained_dir, "f32").gguf_path)
    for question, (prompt, expected) in zip(QUESTIONS + UNSEEN, reference):
        # llama.cpp's own tokenizer (vocabulary, merges, GPT-2 pre-tokenizer) splits the prompt text the same way.
        text = tokenizer.decode(prompt)
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == prompt, question
        assert llama_greedy(llm, prompt, eos) == expected, question
    # The trained exchanges are answered in full and end at EOS: the comparison is not between two empty replies.
    for (question, answer), (_, expected) in zip(EXCHANGES, reference):
        assert expected[-1] == eos and tokenizer.decode(expected[:-1]).strip() == answer.strip(), question


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_f16_agrees_on_95_percent_of_greedy_tokens(trained_dir, greedy_reference):
    tokenizer, reference = greedy_reference
    llm = load_llama(export_gguf(trained_dir, "f16").gguf_path)
    same = total = 0
    for prompt, expected in reference:
        got = llama_greedy(llm, prompt, tokenizer.eos_token_id)
        same += sum(a == b for a, b in zip(got, expected))
        total += max(len(got), len(expected))
    assert total >= 5 * 5 and same / total >= 0.95, f"{same}/{total}"


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_q8_0_loads_and_ends_replies_at_eos(trained_dir, greedy_reference):
    tokenizer, reference = greedy_reference
    result = export_gguf(trained_dir, "q8_0")
    llm = load_llama(result.gguf_path)
    assert llm.metadata["general.file_type"] == "7"
    for prompt, _ in reference[: len(QUESTIONS)]:
        reply = llama_greedy(llm, prompt, tokenizer.eos_token_id)
        assert len(reply) > 2 and reply[-1] == tokenizer.eos_token_id, tokenizer.decode(reply)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_renders_chats_with_the_embedded_template(trained_dir, greedy_reference):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer, reference = greedy_reference
    llm = load_llama(export_gguf(trained_dir, "f32", overwrite=True).gguf_path)
    # The formatter llama-cpp-python builds from the file's template for chat mode (Llama.__init__ does the same).
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token
    )
    assert formatter(messages=MESSAGES).prompt == hf_render(tokenizer, MESSAGES)
    assert llm.chat_format == "chat_template.default"  # the file's template was picked up, not a built-in guess

    # A rendered chat through llama.cpp's tokenizer and sampler, stopping on the formatter's stop string, gives
    # transformers' greedy reply. (Not create_chat_completion: llama-cpp-python 0.3.x checks its stop-token criterion
    # on the prompt before the first sampled token, and this format's prompt ends with EOS, so it returns "".)
    for question, (_, expected) in list(zip(QUESTIONS, reference))[:3]:
        rendered = formatter(messages=[{"role": "user", "content": question}])
        completion = llm.create_completion(
            rendered.prompt,
            temperature=0.0,
            top_k=1,
            max_tokens=MAX_NEW_TOKENS,
            repeat_penalty=1.0,
            stop=rendered.stop,
        )
        assert completion["choices"][0]["finish_reason"] == "stop"
        assert completion["choices"][0]["text"] == tokenizer.decode(expected[:-1]), question


# --------------------------------------------------------------------------------------------------------------
# llama.cpp runs the Llama-style families: logits of random-init models, greedy replies of trained ones
# --------------------------------------------------------------------------------------------------------------

ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 500000.0,
    },
}


def sharp_family_dir(folder: Path, family: str, rope: dict | None = None) -> Path:
    """A random-init model of `family` whose attention scores are scaled up (query and key projections times 8;
    Qwen3's q/k norms, after which the projections' scale is lost, times 2): attention then depends strongly on
    position, so a wrong rope layout or scaling moves the logits by 0.1-0.5 and not by ~1e-3."""
    build_tiny_family_dir(folder, family)
    model = load_model(str(folder))
    if rope is not None:
        model.config.rope_parameters = rope
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(8)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.mul_(2)
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize(
    "family, rope", [(family, None) for family in ARCHITECTURE] + [("llama", "linear"), ("llama", "llama3")]
)
def test_llama_cpp_logits_equal_transformers(family, rope, tmp_path):
    import llama_cpp

    folder = sharp_family_dir(tmp_path / family, family, ROPE_VARIANTS.get(rope))
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder)).eval()
    prompt = render_ids(tokenizer, MESSAGES)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    llm = llama_cpp.Llama(
        model_path=str(export_gguf(folder, "f32").gguf_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False
    )
    assert llm.tokenize(tokenizer.decode(prompt).encode(), add_bos=True, special=True) == prompt
    llm.eval(prompt)
    logits = np.asarray(llm.scores[: len(prompt)])
    error = np.abs(logits - expected).max()
    assert error < 3e-3 * np.abs(expected).max(), (family, rope, error)  # measured 2-5e-4; a wrong layout > 0.1


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_family(request, tmp_path_factory):
    """(folder, tokenizer, [(question, prompt ids, transformers' greedy reply)]) of a tiny model of the family trained
    on the exchanges in its ChatML template (Llama's with SmolLM2's default system message, Qwen2's without)."""
    folder = build_tiny_family_dir(tmp_path_factory.mktemp(f"trained_{request.param}") / "dialog", request.param)
    train_dialog_model(folder, steps=100, learning_rate=1e-2)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder)).eval()
    reference = []
    for question in QUESTIONS + UNSEEN:
        prompt = render_ids(tokenizer, [{"role": "user", "content": question}])
        reference.append((question, prompt, transformers_greedy(model, tokenizer, prompt)))
    return folder, tokenizer, reference


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_family_f32_greedy_equals_transformers(trained_family):
    folder, tokenizer, reference = trained_family
    eos = tokenizer.eos_token_id
    llm = load_llama(export_gguf(folder, "f32").gguf_path)
    for question, prompt, expected in reference:
        text = tokenizer.decode(prompt)
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == prompt, question
        assert llama_greedy(llm, prompt, eos) == expected, question
    for (question, answer), (_, _, expected) in zip(EXCHANGES, reference):
        assert expected[-1] == eos and tokenizer.decode(expected[:-1]) == answer, question


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_family_chat_uses_the_embedded_template(trained_family):
    """llama-cpp-python's chat completion renders the file's ChatML template (with the default system message of
    Llama's) and stops at <|im_end|>: its replies are transformers' greedy ones."""
    folder, tokenizer, reference = trained_family
    llm = load_llama(export_gguf(folder, "f32", overwrite=True).gguf_path)
    assert llm.chat_format == "chat_template.default"
    for question, _, expected in reference[:3]:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": question}],
            temperature=0.0,
            top_k=1,
            max_tokens=MAX_NEW_TOKENS,
            repeat_penalty=1.0,
        )
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(expected[:-1]), question


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_family_q8_0_loads_and_ends_replies_at_eos(trained_family):
    folder, tokenizer, reference = trained_family
    llm = load_llama(export_gguf(folder, "q8_0").gguf_path)
    assert llm.metadata["general.file_type"] == "7"
    for question, prompt, _ in reference[: len(QUESTIONS)]:
        reply = llama_greedy(llm, prompt, tokenizer.eos_token_id)
        assert len(reply) > 2 and reply[-1] == tokenizer.eos_token_id, (question, tokenizer.decode(reply))
