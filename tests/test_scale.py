"""LoRA, the optimizer check and the T4 presets (gpt2ft/scale.py), on the tiny fixture models, offline, on CPU.

python -m pytest tests/test_scale.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_argv

from gpt2ft import cli
from gpt2ft.config import ConfigError, TrainConfig
from gpt2ft.modeling import Hardware
from gpt2ft.scale import (
    EIGHT_BIT_OPTIM,
    apply_method,
    bitsandbytes_installed,
    check_optimizer,
    choose_presets,
    describe_method,
    merge_for_saving,
    settle_lora_targets,
    size_tier,
)

CPU = Hardware("cpu", "CPU", None, None)
T4 = Hardware("cuda", "Tesla T4", (7, 5), 15.0)
A100 = Hardware("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 79.2)
# The released GPT-2 sizes' shapes (the Hub's config.json of each; vocabulary and context are the defaults).
GPT2_SHAPES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
# Llama 3.2 1B's config (meta-llama/Llama-3.2-1B-Instruct): 1,235,814,400 parameters, tied embeddings.
LLAMA_3_2_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
}


def gpt2_config(name: str):
    """A released GPT-2 size's config, built here (the tests stay offline)."""
    from transformers import GPT2Config

    width, layers, heads = GPT2_SHAPES[name.removeprefix("openai-community/")]
    return GPT2Config(n_embd=width, n_layer=layers, n_head=heads)


def presets(config, hardware=T4, explicit=frozenset(), **kwargs):
    """choose_presets with the model's config built offline from its name."""
    return choose_presets(config, hardware, set(explicit), model_config=gpt2_config(config.model), **kwargs)


def batch_from(tokenizer, texts):
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in ids])
    return input_ids, labels


# --------------------------------------------------------------------------------------------------------------
# LoRA end to end through the CLI
# --------------------------------------------------------------------------------------------------------------


def test_lora_run_saves_a_plain_merged_model_equal_to_base_plus_adapter(
    tiny_model_dir, dailydialog_dir, run_dirs, capsys
):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    # A high learning rate so the adapters move well away from their zero start (B = 0 makes base == base+adapter).
    argv = train_argv(
        tiny_model_dir,
        dailydialog_dir,
        run_dirs,
        "--method",
        "lora",
        "--lora-r",
        "4",
        "--max-steps",
        "4",
        "--learning-rate",
        "5e-2",
    )
    assert cli.main(argv) == 0
    out = Path(run_dirs["output"])
    metrics = json.loads((Path(run_dirs["logs"]) / "metrics.json").read_text())
    assert metrics["method"] == "lora"
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] / 5
    assert "trainable of" in capsys.readouterr().err

    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True and adapter_config["r"] == 4
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key], "the merged model must be plain GPT-2"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged) is GPT2LMHeadModel
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    input_ids = torch.arange(2, 40).reshape(2, 19)
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
        adapter_logits = with_adapter(input_ids).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(input_ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3, "training left the adapters at zero"

    assert cli.main(["generate", "--model", str(out), "--greedy", "--max-new-tokens", "5", "Hi"]) == 0


def test_lora_step_changes_only_the_adapters(tiny_model, tiny_tokenizer):
    config = TrainConfig(method="lora", lora_r=4, lora_targets="c_attn,c_fc", gradient_checkpointing=True)
    model, counts = apply_method(tiny_model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert counts["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert any(".c_fc." in name for name in trainable) and not any("c_proj" in name for name in trainable)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Reentrant checkpointing is the case that needs the input-grad hook apply_method installs: without it no
    # gradient reaches the adapters of a checkpointed block.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, labels = batch_from(tiny_tokenizer, ["Hello , how are you ?", "Do you like tea ?"])
    model(input_ids=input_ids, labels=labels).loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name
    )
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and changed <= trainable
    assert any("lora_B" in name for name in changed)


def test_lora_on_llama_targets_its_projections_and_checkpointing_still_trains_them(tiny_llama_dir):
    """`--lora-targets auto` on a Llama: the seven attention and MLP projections, nn.Linear (fan_in_fan_out off);
    under reentrant gradient checkpointing the adapters still get gradients."""
    from gpt2ft.modeling import load_model
    from gpt2ft.scale import build_lora_config

    model = load_model(str(tiny_llama_dir))
    config = TrainConfig(method="lora", lora_r=4, gradient_checkpointing=True)
    lora_config = build_lora_config(config, model)
    assert sorted(lora_config.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert lora_config.fan_in_fan_out is False
    assert describe_method(config, model).startswith("LoRA r=4 alpha=32 on q_proj, k_proj")
    model, counts = apply_method(model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".down_proj." in name for name in trainable) and any(".q_proj." in name for name in trainable)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    input_ids = torch.arange(3, 35).reshape(2, 16)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_lora_targets_are_checked_against_the_models_modules(tiny_llama_dir, tiny_model):
    from gpt2ft.modeling import load_model

    llama = load_model(str(tiny_llama_dir))
    with pytest.raises(
        ConfigError, match=r"^--lora-targets c_attn: c_attn is not a linear module of this llama.*q_proj"
    ):
        apply_method(llama, TrainConfig(method="lora", lora_targets="c_attn"))
    assert "lm_head" not in str(
        pytest.raises(ConfigError, apply_method, llama, TrainConfig(method="lora", lora_targets="x")).value
    )
    # Explicit names are kept as typed; auto on GPT-2 is its Conv1D c_attn and c_proj.
    assert describe_method(TrainConfig(method="lora"), tiny_model) == "LoRA r=16 alpha=32 on c_attn, c_proj"
    model, _ = apply_method(llama, TrainConfig(method="lora", lora_targets="q_proj,v_proj"))
    assert {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}


def test_lora_targets_are_settled_in_the_plan_before_anything_loads(tiny_llama_dir):
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    assert settle_lora_targets(TrainConfig(method="full"), config).lora_targets == "auto"
    assert settle_lora_targets(TrainConfig(method="lora", lora_targets="q_proj, v_proj"), config).lora_targets == (
        "q_proj,v_proj"
    )
    with pytest.raises(ConfigError, match=r"^--lora-targets c_fc: .*choose from down_proj"):
        settle_lora_targets(TrainConfig(method="lora", lora_targets="c_fc"), config)


def test_lora_run_on_llama_saves_a_plain_merged_llama(tiny_llama_dir, dailydialog_dir, run_dirs):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    argv = train_argv(tiny_llama_dir, dailydialog_dir, run_dirs, "--method", "lora", "--lora-r", "4")
    argv += ["--max-steps", "3", "--learning-rate", "5e-2"]
    assert cli.main(argv) == 0
    out = Path(run_dirs["output"])
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is False
    assert set(adapter_config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    training_config = json.loads((out / "training_config.json").read_text())
    assert "q_proj" in json.dumps(training_config)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged) is LlamaForCausalLM
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter"
    ).eval()
    input_ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        merged_logits, adapter_logits = merged(input_ids).logits, with_adapter(input_ids).logits
        with with_adapter.disable_adapter():
            base_logits = with_adapter(input_ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 1e-3, "training left the adapters at zero"


def test_merge_for_saving_full_is_a_no_op(tiny_model):
    model, adapter = merge_for_saving(tiny_model, TrainConfig())
    assert model is tiny_model and adapter is None


def test_unknown_lora_target_names_the_flag(tiny_model):
    with pytest.raises(ConfigError, match=r"^--lora-targets c_attn,q_proj: q_proj .*c_attn, c_fc, c_proj"):
        apply_method(tiny_model, TrainConfig(method="lora", lora_targets="c_attn,q_proj"))
    with pytest.raises(ConfigError, match="^--lora-targets"):
        apply_method(tiny_model, TrainConfig(method="lora", lora_targets=" , "))


# --------------------------------------------------------------------------------------------------------------
# Optimizer check
# --------------------------------------------------------------------------------------------------------------


def test_unknown_optim_exits_2_with_one_line(tiny_model_dir, dailydialog_dir, run_dirs, capsys):
    argv = train_argv(tiny_model_dir, dailydialog_dir, run_dirs, "--optim", "adamw_nonsense", "--max-steps", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --optim adamw_nonsense:")
    assert "adamw_torch" in err
    assert not Path(run_dirs["output"]).exists(), "the check runs before anything is written"


def check(optim: str, tmp_path: Path) -> object:
    """check_optimizer as plan_run calls it, on this CPU."""
    from gpt2ft.training import build_training_args

    return check_optimizer(optim, lambda: build_training_args(TrainConfig(optim=optim), "fp32", CPU, tmp_path), CPU)


def test_eight_bit_optimizer_steps_or_fails_clearly(tiny_model_dir, dailydialog_dir, run_dirs, capsys, tmp_path):
    try:
        check(EIGHT_BIT_OPTIM, tmp_path)
    except ConfigError as error:  # bitsandbytes missing or unable to run here: the CLI must say so in one line
        argv = train_argv(tiny_model_dir, dailydialog_dir, run_dirs, "--optim", EIGHT_BIT_OPTIM, "--max-steps", "1")
        assert cli.main(argv) == 2
        assert str(error).startswith(f"--optim {EIGHT_BIT_OPTIM}:")
        assert capsys.readouterr().err.strip() == f"error: {error}"
        return
    argv = train_argv(
        tiny_model_dir,
        dailydialog_dir,
        run_dirs,
        "--optim",
        EIGHT_BIT_OPTIM,
        "--max-steps",
        "2",
        "--learning-rate",
        "1e-2",
        "--keep-checkpoints",
    )
    assert cli.main(argv) == 0
    from safetensors.torch import load_file

    from gpt2ft.checkpoints import checkpoint_dir

    trained = load_file(str(Path(run_dirs["output"]) / "model.safetensors"))
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # The Trainer really used bitsandbytes' 8-bit states: its checkpointed optimizer holds uint8 moments (bitsandbytes
    # nests them one level down; embeddings and tensors under 4096 elements stay 32-bit).
    checkpoint = sorted(checkpoint_dir(run_dirs["output"]).glob("checkpoint-*"))[-1]
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]

    def tensors(entry):
        for value in entry.values():
            yield from tensors(value) if isinstance(value, dict) else [value]

    assert any(
        torch.is_tensor(value) and value.dtype == torch.uint8 for entry in state.values() for value in tensors(entry)
    )


def test_optimizer_check_messages(monkeypatch, tmp_path):
    import transformers.trainer_optimizer

    import gpt2ft.scale as scale

    assert check("adamw_torch", tmp_path).optim == "adamw_torch"
    with pytest.raises(ConfigError, match=r"^--optim sgdx: not an optimizer"):
        check("sgdx", tmp_path)
    # What an optimizer needs comes from the Trainer itself, e.g. bitsandbytes for the 8-bit ones.
    monkeypatch.setattr(transformers.trainer_optimizer, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--optim adamw_bnb_8bit: You need to install `bitsandbytes`"):
        check("adamw_bnb_8bit", tmp_path)
    monkeypatch.undo()

    def broken(optimizer_cls, optimizer_kwargs, device):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(scale, "probe_optimizer", broken)
    with pytest.raises(ConfigError) as caught:
        check("paged_adamw_8bit", tmp_path)
    assert str(caught.value).startswith("--optim paged_adamw_8bit: bitsandbytes cannot run it on CPU")
    assert "\n" not in str(caught.value)


def test_the_probe_steps_the_optimizer_class_the_trainer_builds(monkeypatch, tmp_path):
    import gpt2ft.scale as scale

    probed = {}
    monkeypatch.setattr(
        scale, "probe_optimizer", lambda cls, kwargs, device: probed.update(cls=cls, kwargs=kwargs, device=device)
    )
    check("paged_adamw_8bit", tmp_path)
    assert probed["cls"].__module__.startswith("bitsandbytes") and probed["device"] == "cpu"
    assert probed["kwargs"].get("optim_bits") == 8 and probed["kwargs"].get("is_paged") is True
    probed.clear()
    check("adamw_torch", tmp_path)
    assert not probed  # only bitsandbytes optimizers are stepped


# --------------------------------------------------------------------------------------------------------------
# T4 presets
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-xl", "openai-community/gpt2-xl"])
def test_xl_on_a_t4_gets_lora_8bit_and_checkpointing(name):
    config, notes = presets(TrainConfig(model=name))
    assert config.method == "lora" and config.gradient_checkpointing
    assert config.optim == (EIGHT_BIT_OPTIM if bitsandbytes_installed() else "auto")
    assert config.batch_size * config.gradient_accumulation_steps == 16
    assert notes and any("gpt2-xl" in note for note in notes) and any("--no-t4-presets" in note for note in notes)
    assert "1,558M parameters" in notes[0] and "GiB" in notes[1]


def test_medium_and_large_presets():
    medium, notes = presets(TrainConfig(model="gpt2-medium"))
    assert medium.method == "full" and medium.gradient_checkpointing and medium.optim == "auto"
    assert (medium.batch_size, medium.gradient_accumulation_steps) == (8, 2) and notes
    large, notes = presets(TrainConfig(model="gpt2-large"))
    assert large.gradient_checkpointing and notes
    if bitsandbytes_installed():
        assert large.method == "full" and large.optim == EIGHT_BIT_OPTIM
    else:
        assert large.method == "lora"


def test_presets_go_by_parameter_count_in_every_family():
    """The bounds sit half-way between the released GPT-2 sizes, so each gets its own settings; a Llama 3.2 1B
    (1.24B parameters) gets what gpt2-xl gets: LoRA and checkpointing."""
    from gpt2ft.families import parameter_count

    counts = {name: parameter_count(gpt2_config(name).to_dict()) for name in GPT2_SHAPES}
    assert [size_tier(counts[name]) for name in GPT2_SHAPES] == [0, 1, 2, 3]
    assert size_tier(parameter_count(LLAMA_3_2_1B)) == 3
    llama, notes = choose_presets(TrainConfig(model="my-llama"), T4, set(), model_config=LLAMA_3_2_1B)
    assert llama.method == "lora" and llama.gradient_checkpointing and llama.lora_targets == "auto"
    assert (llama.batch_size, llama.gradient_accumulation_steps) == (4, 4)
    assert notes and "1,236M parameters" in notes[0]
    settled = settle_lora_targets(llama, LLAMA_3_2_1B)
    assert settled.lora_targets == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    assert describe_method(settled).endswith("on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")


def test_a_small_model_that_does_not_fit_as_set_gets_the_next_presets():
    """GPT-2 small has no presets, unless the memory estimate says its settings do not fit: batch 128 of 1,024-token
    padded rows does not, so it gets checkpointing (its batch, typed, is kept)."""
    config = TrainConfig(model="gpt2", batch_size=128, batching="pad")
    assert presets(TrainConfig(model="gpt2")) == (TrainConfig(model="gpt2"), [])
    settled, notes = presets(config, explicit={"batch_size"})
    assert settled.gradient_checkpointing and settled.batch_size == 128
    assert "beyond" in notes[1] and "--batch-size 128" in notes[1]


def test_no_presets_for_small_cpu_big_gpus_or_when_disabled():
    for config, hardware in [
        (TrainConfig(model="gpt2"), T4),
        (TrainConfig(model="openai-community/gpt2"), T4),
        (TrainConfig(model="gpt2-xl"), CPU),
        (TrainConfig(model="gpt2-xl"), A100),
        (TrainConfig(model="gpt2-xl", t4_presets=False), T4),
    ]:
        assert presets(config, hardware) == (config, [])


def test_presets_keep_the_settings_the_user_typed():
    config, notes = presets(
        TrainConfig(model="gpt2-xl", batch_size=2, optim="adamw_torch"), explicit={"batch_size", "optim"}
    )
    assert config.batch_size == 2 and config.gradient_accumulation_steps == 1 and config.optim == "adamw_torch"
    assert config.method == "lora" and config.gradient_checkpointing
    assert any("--optim adamw_torch" in note for note in notes)


def test_a_typed_value_equal_to_the_default_is_kept_too(tiny_model_dir, dailydialog_dir, run_dirs):
    """`--learning-rate 5e-5` with gpt2-xl on a T4 stays 5e-5 (the preset's 2e-4 is only for a rate left unset)."""
    from conftest import train_argv as argv_for

    args = cli.build_parser().parse_args(argv_for("gpt2-xl", dailydialog_dir, run_dirs, "--learning-rate", "5e-5"))
    config, explicit = cli.config_from_args(args)
    assert "learning_rate" in explicit and "batch_size" in explicit  # train_argv types --batch-size 8 too
    settled, notes = presets(config, explicit=explicit)
    assert settled.learning_rate == 5e-5 and settled.batch_size == 8
    assert settled.method == "lora"  # what was not typed still gets the preset
    unset, _ = presets(config, explicit=explicit - {"learning_rate"})
    assert unset.learning_rate == 2e-4


def test_local_folder_size_from_config(tmp_path, tiny_model_dir):
    """A local folder is sized by its config.json (a fine-tuned gpt2-large saved locally counts as large)."""
    large = tmp_path / "my-large"
    large.mkdir()
    config_json = {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20, "vocab_size": 50257}
    (large / "config.json").write_text(json.dumps(config_json))
    settled, notes = choose_presets(TrainConfig(model=str(large)), T4, set(), model_config=config_json)
    assert settled.gradient_checkpointing and "774M parameters" in notes[0]
    tiny = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert choose_presets(TrainConfig(model=str(tiny_model_dir)), T4, set(), model_config=tiny)[1] == []


def test_a_config_of_absurd_size_exits_2_in_one_line_within_seconds(tmp_path):
    """n_layer 100,000 x n_embd 1,000,000 would make transformers allocate forever: refused from config.json alone,
    before torch loads or anything is built."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 100_000, "n_embd": 1_000_000, "n_head": 8, "vocab_size": 50257})
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gpt2ft", "train", "--model", str(folder), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "describes 1.2e+18 parameters" in lines[0] and str(folder) in lines[0]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()
