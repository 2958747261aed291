"""The memory estimate (gpt2ft/memory.py): the breakdown, what changes it, the one-line refusal with what fits,
the adapter count against PEFT's, and the activation formula against what autograd really keeps, on CPU.

python -m pytest tests/test_memory.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt2ft.config import PreferConfig, TrainConfig
from gpt2ft.errors import TrainingError
from gpt2ft.families import parameter_count
from gpt2ft.memory import (
    GIB,
    check_memory,
    estimate_memory,
    estimate_run,
    layer_activation_bytes,
    micro_batch,
    model_shape,
)
from gpt2ft.modeling import Hardware

T4 = Hardware("cuda", "Tesla T4", (7, 5), 15.0)
CPU = Hardware("cpu", "CPU", None, None)
GPT2_SHAPES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-xl": (1600, 48, 25)}


def gpt2_config(name: str):
    from transformers import GPT2Config

    width, layers, heads = GPT2_SHAPES[name]
    return GPT2Config(n_embd=width, n_layer=layers, n_head=heads)


def estimate(name: str = "gpt2", **settings):
    settings = {"tokens": 16 * 512, "row_width": 1024, **settings}
    return estimate_memory(model_shape(gpt2_config(name)), **settings)


def test_gpt2_small_full_fp16_adamw_fits_a_t4():
    small = estimate()
    params = 124_439_808
    assert (small.weights, small.gradients, small.optimizer) == (4 * params, 4 * params, 8 * params)
    assert 2 * GIB < small.activations < 8 * GIB and small.fits(T4.memory_gb)
    assert small.describe().startswith("weights 0.5 + grads 0.5 + AdamW 0.9 + activations ")
    line = check_memory(TrainConfig(), gpt2_config("gpt2"), T4, "fp16", 1024, "adamw_torch_fused", True)
    assert line.startswith("memory estimate on Tesla T4 (15.0 GiB), 8,192 tokens a micro-batch: weights 0.5 + ")
    assert line.endswith(" GiB") and "\n" not in line


def test_nothing_is_estimated_off_cuda():
    assert (
        check_memory(TrainConfig(model="gpt2-xl"), gpt2_config("gpt2-xl"), CPU, "fp32", 1024, "adamw_torch", True)
        is None
    )


def test_gpt2_xl_full_does_not_fit_and_the_line_says_what_does():
    config = TrainConfig(model="gpt2-xl")
    assert not estimate_run(config, model_shape(gpt2_config("gpt2-xl")), 1024).fits(T4.memory_gb)
    with pytest.raises(TrainingError) as caught:
        check_memory(config, gpt2_config("gpt2-xl"), T4, "fp16", 1024, "adamw_torch_fused", True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("gpt2-xl: full fine-tuning with AdamW at --batch-size 16 needs ~")
    assert "the Tesla T4 has 15.0 GiB: --method lora" in message and ") fits" in message
    # No full fine-tuning fits (16 B/param alone is 23 GiB); LoRA at the same batch does, with checkpointing.
    assert message.endswith(" GiB) fits") and "--method lora --gradient-checkpointing (~" in message
    without_eight_bit = str(
        pytest.raises(
            TrainingError, check_memory, config, gpt2_config("gpt2-xl"), T4, "fp16", 1024, "adamw_torch_fused", False
        ).value
    )
    assert "adamw_bnb_8bit" not in without_eight_bit


def test_a_model_that_fits_with_other_settings_is_told_which():
    """gpt2-medium, full, batch 16 of 1,024-token padded rows: too much activation memory. Checkpointing at the same
    batch fits, and full fine-tuning is named first; with checkpointing on already, the same effective batch in
    smaller pieces."""
    config = TrainConfig(model="gpt2-medium", batching="pad")
    with pytest.raises(TrainingError) as caught:
        check_memory(config, gpt2_config("gpt2-medium"), T4, "fp16", 1024, "adamw_torch_fused", True)
    fits = str(caught.value).split("GiB: ", 1)[1]
    assert fits.startswith("--gradient-checkpointing (~") and "; so does --method lora" in fits
    wide = config.replace(batch_size=64, gradient_checkpointing=True)
    with pytest.raises(TrainingError) as caught:
        check_memory(wide, gpt2_config("gpt2-medium"), T4, "fp16", 1024, "adamw_torch_fused", True)
    fits = str(caught.value).split("GiB: ", 1)[1]
    assert fits.startswith("--batch-size 32 --gradient-accumulation-steps 2 (~")


def test_lora_8bit_checkpointing_and_batch_size_move_the_estimate_the_right_way():
    full = estimate("gpt2-xl")
    lora = estimate("gpt2-xl", method="lora", lora_targets=("c_attn", "c_proj"))
    assert lora.gradients < full.gradients / 50 and lora.optimizer < full.optimizer / 50
    assert lora.weights > full.weights  # the adapters come on top of the frozen weights
    # LoRA keeps more activations (each adapter's own copy of its input, measured): it pays with checkpointing.
    assert lora.activations > full.activations
    lora_checkpointed = estimate("gpt2-xl", method="lora", lora_targets=("c_attn",), gradient_checkpointing=True)
    assert lora_checkpointed.total < full.total / 5
    eight = estimate("gpt2-xl", optim="adamw_bnb_8bit")
    assert eight.optimizer == full.optimizer // 4 and eight.optimizer_name == "8-bit AdamW"
    assert (eight.weights, eight.gradients, eight.activations) == (full.weights, full.gradients, full.activations)
    checkpointed = estimate("gpt2-xl", gradient_checkpointing=True)
    assert checkpointed.activations < full.activations / 5
    totals = [estimate(tokens=batch * 512).total for batch in (1, 2, 4, 8, 16, 32)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    fp32 = estimate(precision="fp32")
    assert fp32.activations > estimate().activations


def test_the_micro_batch_before_the_data_is_read():
    assert micro_batch(TrainConfig(batch_size=16), 1024) == (16 * 512, 1024)  # packed: a 512-token row a dialogue
    assert micro_batch(TrainConfig(batch_size=16), 256) == (16 * 256, 256)
    assert micro_batch(TrainConfig(batch_size=8, batching="pad"), 1024) == (8 * 1024, 1024)
    assert micro_batch(PreferConfig(batch_size=4), 512) == (2 * 4 * 512, 512)  # chosen and rejected


def test_shape_and_adapter_count_agree_with_transformers_and_peft(tiny_model, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    from gpt2ft.modeling import load_model

    for model, targets, conv1d in (
        (tiny_model, ["c_attn", "c_proj", "c_fc"], True),
        (
            load_model(str(tiny_llama_dir)),
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            False,
        ),
    ):
        shape = model_shape(model.config)
        assert shape.parameters == model.num_parameters() == parameter_count(model.config.to_dict())
        assert set(targets) <= set(shape.adaptable) and "lm_head" not in shape.adaptable
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets, fan_in_fan_out=conv1d))
        trainable, _ = peft.get_nb_trainable_parameters()
        assert shape.adapter_parameters(targets, 4) == trainable
        peft.unload()


def saved_bytes(model, tokens_shape, precision):
    """The distinct storages autograd keeps for the backward pass of one forward (the weights themselves apart)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows, width = tokens_shape
    ids = torch.randint(0, 300, (rows, width))
    mask = torch.tril(torch.ones(width, width, dtype=torch.bool))[None, None].expand(rows, 1, width, width)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(width).repeat(rows, 1))
    return sum(seen.values())


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_the_per_block_formula_holds_what_autograd_keeps(family):
    """Measured like the figures in memory.layer_activation_bytes (2 and 4 blocks subtracted): the formula is
    exact or above (never below) what autograd keeps, and not far above."""
    import transformers
    from transformers import AutoModelForCausalLM

    def build(layers):
        if family == "gpt2":
            config = transformers.GPT2Config(n_embd=96, n_layer=layers, n_head=3, vocab_size=300, attn_pdrop=0.0)
        else:
            cls = transformers.Qwen3Config if family == "qwen3" else transformers.LlamaConfig
            config = cls(hidden_size=96, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=3)
            config.update(dict(num_key_value_heads=1, head_dim=32, vocab_size=300))
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()

    rows, width = 2, 64
    for precision in ("bf16", "fp32"):
        two, four = (saved_bytes(build(layers), (rows, width), precision) for layers in (2, 4))
        measured = (four - two) / 2 / (rows * width)
        shape = model_shape(build(2).config)
        copies = 2 * shape.block_matmul_parameters / 2 / (rows * width) if precision == "bf16" else 0
        mask = (2 if precision == "bf16" else 4) * width
        formula = layer_activation_bytes(shape, precision) + mask + copies
        assert measured <= formula * 1.01 and formula < 1.5 * measured, (precision, measured, formula)


def test_plan_refuses_a_run_that_cannot_fit_before_any_weight_loads(tmp_path, monkeypatch, capsys):
    """plan_stage on a (pretend) T4: a folder with gpt2-xl's config.json and no real weights (an empty
    model.safetensors: loading it would fail) is planned from its config alone; without presets the plan stops in
    one line, with presets it fits and says so."""
    import gpt2ft.runs as runs
    from gpt2ft.training import plan_run

    folder = tmp_path / "xl"
    folder.mkdir()
    gpt2_config("gpt2-xl").save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text(json.dumps({}))
    monkeypatch.setattr(runs, "detect_hardware", lambda: T4)
    monkeypatch.setattr(runs, "check_optimizer", lambda optim, build_args, hardware: SimpleNamespace(process_index=0))
    settings = dict(model=str(folder), output_dir=str(tmp_path / "out"), logs_dir=str(tmp_path / "logs"))
    with pytest.raises(TrainingError, match=r"needs ~.*, the Tesla T4 has 15.0 GiB: .*fits$"):
        plan_run(TrainConfig(**settings, t4_presets=False), set())
    capsys.readouterr()
    plan = plan_run(TrainConfig(**settings), set())
    assert plan.config.method == "lora" and plan.config.lora_targets == "c_attn,c_proj"
    lines = [line.removeprefix("gpt2ft: ") for line in capsys.readouterr().err.splitlines()]
    assert any(line.startswith("t4 presets for ") for line in lines)
    assert any(line.startswith("memory estimate on Tesla T4 (15.0 GiB)") for line in lines), lines
    assert not Path(tmp_path / "out").exists()
