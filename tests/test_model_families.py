"""Every stage with the families beside GPT-2: a tiny random-init Llama (tied embeddings, SmolLM2's ChatML template
with its default system message) and Qwen2 (untied, ChatML without one), trained, evaluated, resumed, asked for
replies, preference-tuned and loaded with plain transformers, offline.

    python -m pytest tests/test_model_families.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import Crash, CrashAt, config_for, train_argv, write_records

from gpt2ft.cli import main
from gpt2ft.training import train

# Two exchanges a tiny model learns in a few hundred steps: the reply is predictable from the question.
LEARN_RATE = ("--learning-rate", "3e-3", "--epochs", "4")


def run_train(model_dir, data, dirs, *flags):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(train_argv(model_dir, data, dirs, *flags))
    lines = [line for line in stdout.getvalue().splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, stderr.getvalue()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_run(request, tmp_path_factory, dailydialog_dir):
    """One finished `train` of each family on the synthetic DailyDialog, through the command line."""
    from conftest import build_tiny_family_dir

    root = tmp_path_factory.mktemp(f"{request.param}_run")
    model_dir = build_tiny_family_dir(root / "base", request.param)
    dirs = {name: str(root / name) for name in ("output", "logs", "images", "cache")}
    code, metrics, err = run_train(model_dir, dailydialog_dir, dirs, *LEARN_RATE)
    assert code == 0, err
    return {"family": request.param, "base": model_dir, "dirs": dirs, "metrics": metrics, "stderr": err}


def test_training_reports_the_starting_model_beside_the_trained_one(family_run):
    metrics = family_run["metrics"]
    for prefix in ("eval", "test"):
        for key in ("loss", "perplexity", "bits_per_byte"):
            assert metrics[f"base_{prefix}_{key}"] > 0 and metrics[f"{prefix}_{key}"] > 0
        assert metrics[f"{prefix}_loss"] < metrics[f"base_{prefix}_loss"] - 1.0  # it learned the exchanges
        assert metrics[f"{prefix}_bits_per_byte"] < metrics[f"base_{prefix}_bits_per_byte"]
    assert metrics["chat_template"].startswith("ChatML")
    assert (
        "validation: loss" in family_run["stderr"] and "(the starting model -> the trained one)" in family_run["stderr"]
    )
    assert "missing keys" not in family_run["stderr"]  # tied embeddings load back without a warning


def test_the_saved_model_keeps_its_template_and_stops_at_the_end_of_turn(family_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(family_run["dirs"]["output"])
    base = AutoTokenizer.from_pretrained(family_run["base"])
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template == base.chat_template  # trained in the model's own format, and saved with it
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((output / "generation_config.json").read_text())
    assert end in (
        [generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int) else generation["eos_token_id"]
    )
    model, info = AutoModelForCausalLM.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family_run["family"]]


def test_replies_end_with_the_end_of_turn_token(family_run):
    from gpt2ft.generate import generate_reply, load_for_generation

    model, tokenizer = load_for_generation(family_run["dirs"]["output"])
    replies = [
        generate_reply(model, tokenizer, [question], greedy=True, max_new_tokens=30)
        for question in ("Hello, how are you?", "What time is it?", "Do you like tea?")
    ]
    assert all(reply.ended_with_eos and reply.text for reply in replies)
    assert "<|im_end|>" not in " ".join(reply.text for reply in replies)


def test_plain_transformers_pipeline_answers_chat_messages(family_run):
    from transformers import pipeline

    chat = pipeline("text-generation", model=family_run["dirs"]["output"])
    answer = chat([{"role": "user", "content": "Do you like tea?"}], max_new_tokens=20, do_sample=False)
    assert answer[0]["generated_text"][-1]["role"] == "assistant"
    assert answer[0]["generated_text"][-1]["content"].strip()


def test_eval_scores_the_saved_model_as_training_did(family_run, dailydialog_dir, capsys):
    dirs = family_run["dirs"]
    code = main(["eval", "--model", dirs["output"], "--split", "test", "--cache-dir", dirs["cache"]])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(family_run["metrics"]["test_loss"], rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(family_run["metrics"]["test_bits_per_byte"], rel=1e-4)


def test_a_crashed_run_resumes_to_the_same_totals(tmp_path, tiny_llama_dir, dailydialog_dir):
    flags = ("--max-steps", "8", "--eval-steps", "4", "--keep-checkpoints")

    def dirs(name):
        return {key: str(tmp_path / name / key) for key in ("output", "logs", "images", "cache")}

    reference = train(config_for(tiny_llama_dir, dailydialog_dir, dirs("straight"), *flags))
    with pytest.raises(Crash):
        train(config_for(tiny_llama_dir, dailydialog_dir, dirs("resumed"), *flags), callbacks=[CrashAt(at=6)])
    resumed = train(config_for(tiny_llama_dir, dailydialog_dir, dirs("resumed"), *flags))
    assert resumed.resumed_from.endswith("checkpoint-4")
    for key in ("steps", "train_tokens"):
        assert resumed.metrics[key] == reference.metrics[key]
    assert resumed.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-4)
    assert resumed.metrics["base_eval_loss"] == pytest.approx(reference.metrics["base_eval_loss"], rel=1e-6)


def test_dpo_tunes_a_llama_on_preference_pairs(family_run, tmp_path, capsys):
    if family_run["family"] != "llama":
        pytest.skip("one family is enough for the preference stage")
    questions = ["Hello , how are you ?", "What time is it ?", "Do you like tea ?", "Where are you going ?"]
    records = [
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": "Of course . " + question}],
            "rejected": [{"role": "assistant", "content": "Ugh . " + question}],
        }
        for question in questions * 10
    ]
    data = write_records(tmp_path / "prefs.jsonl", records)
    dirs = family_run["dirs"]
    code = main(
        [
            "prefer",
            "--model",
            dirs["output"],
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "preferred"),
            "--logs-dir",
            str(tmp_path / "logs"),
            "--images-dir",
            str(tmp_path / "images"),
            "--cache-dir",
            dirs["cache"],
            "--epochs",
            "2",
            "--learning-rate",
            "1e-3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["reward_accuracy_after"] > 0.5 and metrics["steps"] > 0
    for key in ("base_eval_loss", "eval_loss", "base_test_perplexity", "test_perplexity", "eval_bits_per_byte"):
        assert metrics[key] is not None and metrics[key] > 0
    saved = Path(tmp_path / "preferred")
    assert (saved / "model.safetensors").is_file() and json.loads((saved / "training_config.json").read_text())[
        "stage"
    ] == "prefer"


@pytest.mark.parametrize(
    "change, found",
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, "model_type 'bert' (BertForMaskedLM)"),
        (
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True},
            "model_type 't5'",
        ),
        ({"model_type": "my_llama", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, "needs remote code"),
    ],
)
def test_another_architecture_is_one_line_naming_what_is_supported(
    tmp_path, tiny_llama_dir, dailydialog_dir, change, found
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    dirs = {key: str(tmp_path / key) for key in ("output", "logs", "images", "cache")}
    code, metrics, err = run_train(folder, dailydialog_dir, dirs)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and metrics is None and len(lines) == 1, err
    assert found in lines[0] and "Llama" in lines[0] and "GPT-2" in lines[0]
    assert not Path(dirs["output"]).exists()
