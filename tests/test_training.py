"""gpt2ft.training and the train/eval/generate commands end to end, on a tiny GPT-2 and synthetic dialogues."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import read_jsonl, train_argv

from gpt2ft.cli import main
from gpt2ft.config import TrainConfig
from gpt2ft.evaluation import evaluate_dialogs, recompute_loss_from_dump
from gpt2ft.modeling import Hardware, choose_precision
from gpt2ft.training import build_training_args, check_output_dir, save_final_model, TrainingError

METRIC_KEYS = {
    "train_loss", "eval_loss", "eval_perplexity", "train_runtime_s", "train_tokens", "train_tokens_per_s", "epochs",
    "steps", "train_dialogs", "eval_dialogs",
}


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, dailydialog_dir):
    """One short training run shared by the tests below: 3 epochs on the synthetic dialogues."""
    root = tmp_path_factory.mktemp("trained")
    dirs = {name: str(root / name) for name in ("output", "logs", "images", "cache")}
    argv = train_argv(tiny_model_dir, dailydialog_dir, dirs, "--epochs", "3", "--learning-rate", "3e-3")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0
    return dirs, last_json_line(stdout.getvalue())


def test_train_prints_and_writes_the_metrics(trained):
    dirs, printed = trained
    assert METRIC_KEYS <= set(printed)
    saved = json.loads(Path(dirs["logs"], "metrics.json").read_text())
    assert saved["eval_loss"] == printed["eval_loss"]
    assert math.isclose(saved["eval_perplexity"], math.exp(saved["eval_loss"]))
    assert saved["epochs"] == 3 and saved["steps"] > 0 and saved["train_tokens"] > 0
    history = read_jsonl(Path(dirs["logs"], "log_history.jsonl"))
    assert any("eval_loss" in record for record in history) and any("loss" in record for record in history)


def test_train_tokens_count_targets_not_padding(trained, tiny_tokenizer):
    dirs, printed = trained

    # 3 epochs over the training rows: every target token counted once an epoch.
    from datasets import load_from_disk

    cached = next(Path(dirs["cache"], "tokenized").iterdir())
    rows = load_from_disk(str(cached))["train"]
    assert printed["train_tokens"] == 3 * sum(rows["n_targets"])


def test_saved_folder_loads_with_plain_transformers(trained):
    dirs, _ = trained
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    output = Path(dirs["output"])
    assert (output / "model.safetensors").is_file()
    assert not list(output.glob("*.bin"))
    assert not (output / "checkpoints").exists()  # removed after a successful run
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    generation = GenerationConfig.from_pretrained(output)
    assert generation.eos_token_id == tokenizer.eos_token_id == generation.pad_token_id
    assert generation.do_sample and 40 <= generation.max_new_tokens <= 60
    saved = json.loads((output / "training_config.json").read_text())
    assert saved["config"]["epochs"] == 3 and "gpt2ft_version" in saved
    assert model.config.model_type == "gpt2"


def test_eval_matches_training_and_dump_reproduces_the_loss(trained, dailydialog_dir, tmp_path, capsys):
    dirs, printed = trained
    dump = tmp_path / "dump.jsonl"
    code = main(["eval", "--model", dirs["output"], "--data", str(dailydialog_dir), "--split", "validation",
                 "--cache-dir", dirs["cache"], "--dump-tokens", str(dump)])
    assert code == 0
    result = last_json_line(capsys.readouterr().out)
    assert {"split", "dialogs", "tokens", "loss", "perplexity"} <= set(result)
    assert result["dialogs"] == printed["eval_dialogs"] and result["tokens"] == printed["eval_tokens"]
    assert result["loss"] == pytest.approx(printed["eval_loss"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    records = read_jsonl(dump)
    assert all(len(r["input_ids"]) == len(r["labels"]) for r in records)
    recomputed = recompute_loss_from_dump(AutoModelForCausalLM.from_pretrained(dirs["output"]), records)
    assert recomputed == pytest.approx(result["loss"], rel=1e-5)


def test_generate_prints_a_reply(trained, capsys):
    dirs, _ = trained
    assert main(["generate", "--model", dirs["output"], "--greedy", "--max-new-tokens", "8", "Hello, how are you?"]) == 0
    out = capsys.readouterr().out
    # A 30-step tiny model may well answer with an empty turn; what matters is one clean line, no special tokens.
    assert out.endswith("\n") and out.count("\n") == 1 and "<|endoftext|>" not in out


def test_training_clearly_lowers_the_eval_loss(trained, tiny_model_dir, dailydialog_dir):
    dirs, printed = trained
    from gpt2ft.data import prepare_dialogs
    from gpt2ft.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    validation = prepare_dialogs(str(dailydialog_dir)).dialogs["validation"]
    before = evaluate_dialogs(model, tokenizer, validation)["loss"]
    assert printed["eval_loss"] < before - 1.0, (before, printed["eval_loss"])


def test_rerun_into_own_output_is_allowed_but_foreign_folder_is_refused(trained, tmp_path):
    dirs, _ = trained
    check_output_dir(dirs["output"], overwrite=False)  # a previous gpt2ft model: fine
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(TrainingError, match="--output-dir"):
        check_output_dir(foreign, overwrite=False)
    check_output_dir(foreign, overwrite=True)


def test_final_save_is_atomic(tmp_path, tiny_model, tiny_tokenizer):
    from gpt2ft.generate import build_generation_config

    class Boom(RuntimeError):
        pass

    output = tmp_path / "model"
    save_final_model(tiny_model, tiny_tokenizer, build_generation_config(tiny_tokenizer), {"gpt2ft_version": "x"}, output)
    before = sorted(p.name for p in output.iterdir())

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise Boom("disk full")

    with pytest.raises(Boom):
        save_final_model(tiny_model, BrokenTokenizer(), build_generation_config(tiny_tokenizer), {"gpt2ft_version": "y"}, output)
    assert sorted(p.name for p in output.iterdir()) == before  # the previous model is untouched
    assert json.loads((output / "training_config.json").read_text())["gpt2ft_version"] == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize(
    "hardware, expected",
    [
        (Hardware("cpu", "CPU", None, None), "fp32"),
        (Hardware("cuda", "Tesla T4", (7, 5), 15.0), "fp16"),
        (Hardware("cuda", "NVIDIA A100", (8, 0), 40.0), "bf16"),
        (Hardware("cuda", "NVIDIA H100", (9, 0), 80.0), "bf16"),
    ],
)
def test_precision_follows_compute_capability(hardware, expected):
    assert choose_precision("auto", hardware)[0] == expected


def test_bf16_is_refused_on_a_t4():
    from gpt2ft.modeling import ModelError

    with pytest.raises(ModelError, match="no bf16 units"):
        choose_precision("bf16", Hardware("cuda", "Tesla T4", (7, 5), 15.0))


def test_training_args_use_the_v5_api(tmp_path):
    args = build_training_args(TrainConfig(eval_steps=5), "fp32", Hardware("cpu", "CPU", None, None), tmp_path)
    assert args.eval_strategy == "steps" == args.save_strategy and args.eval_steps == 5
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.train_sampling_strategy == "random"
    padded = build_training_args(TrainConfig(batching="pad"), "fp16", Hardware("cuda", "Tesla T4", (7, 5), 15.0), tmp_path)
    assert padded.train_sampling_strategy == "group_by_length" and padded.fp16 and not padded.bf16
    assert padded.optim == "adamw_torch_fused"
