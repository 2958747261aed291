"""The model families (gpt2ft/families.py): parameter counts from a config alone, checked against transformers' own
models (built on the meta device: no memory, no weights), and the refusals of what gpt2ft does not fine-tune.

python -m pytest tests/test_families.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt2ft.errors import ModelError
from gpt2ft.families import MAX_PARAMETERS, check_architecture, check_size, parameter_count, supported_list

SMOLLM2 = Path("/work/models/smollm2/hf")
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL.update(num_key_value_heads=2, vocab_size=400, max_position_embeddings=512)


def meta_count(config) -> int:
    """The parameters transformers builds for `config` (tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


@pytest.mark.parametrize(
    "shape, expected",
    [((768, 12, 12), 124_439_808), ((1024, 24, 16), 354_823_168), ((64, 2, 2), None)],
    ids=["gpt2", "gpt2-medium", "tiny"],
)
def test_gpt2_counts_match_transformers(shape, expected):
    from transformers import GPT2Config

    width, layers, heads = shape
    for tied in (True, False):
        config = GPT2Config(n_embd=width, n_layer=layers, n_head=heads, tie_word_embeddings=tied)
        count = parameter_count(config.to_dict())
        assert count == meta_count(config)
        if expected and tied:
            assert count == expected


@pytest.mark.parametrize(
    "class_name, extra",
    [
        ("LlamaConfig", {"tie_word_embeddings": True}),
        ("LlamaConfig", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
        ("Qwen2Config", {"tie_word_embeddings": False}),
        ("Qwen2Config", {"tie_word_embeddings": True}),
        ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 16}),
        ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    ],
    ids=["llama", "llama-biases", "qwen2", "qwen2-tied", "qwen3", "mistral"],
)
def test_llama_style_counts_match_transformers(class_name, extra):
    import transformers

    config = getattr(transformers, class_name)(**SMALL, **extra)
    assert parameter_count(config.to_dict()) == meta_count(config)
    # config.json as save_pretrained writes it (only what differs from the defaults) gives the same count.
    assert parameter_count(json.loads(config.to_json_string())) == meta_count(config)


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="no SmolLM2 config at /work/models/smollm2/hf")
def test_smollm2_135m_count_from_its_config_json():
    from transformers import AutoConfig

    config = json.loads((SMOLLM2 / "config.json").read_text())
    assert parameter_count(config) == 134_515_008
    assert meta_count(AutoConfig.from_pretrained(SMOLLM2)) == 134_515_008


@pytest.mark.parametrize(
    "config, found",
    [
        (
            {"model_type": "bert", "architectures": ["BertForMaskedLM"]},
            "model_type 'bert' (BertForMaskedLM), not a causal",
        ),
        (
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
            "model_type 't5' (T5ForConditionalGeneration), an encoder-decoder",
        ),
        (
            {"model_type": "phi3_custom", "auto_map": {"AutoModelForCausalLM": "modeling.Phi3ForCausalLM"}},
            "model_type 'phi3_custom' that needs remote code",
        ),
    ],
    ids=["bert", "t5", "auto_map"],
)
def test_unsupported_architectures_are_refused_in_one_line(config, found):
    with pytest.raises(ModelError) as caught:
        check_architecture(config, "./some-model")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--model ./some-model: {found}")
    assert message.endswith(supported_list()) and "Llama" in message and "GPT-2" in message


def test_check_size_refuses_a_size_beyond_any_machine():
    huge = {"model_type": "gpt2", "n_layer": 100_000, "n_embd": 1_000_000, "vocab_size": 50257}
    with pytest.raises(ModelError, match=r"describes 1.2e\+18 parameters, beyond any machine"):
        check_size(huge, "huge")
    assert (
        check_size({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "vocab_size": 50257}, "gpt2") < MAX_PARAMETERS
    )
    with pytest.raises(ModelError, match="unusable size"):
        check_size({"model_type": "llama", "hidden_size": "wide", "vocab_size": 10}, "bad")
