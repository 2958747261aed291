"""gpt2ft.training and gpt2ft.checkpoints: the stages of a run, its numbers, its saves; train/eval/generate end to end
on a tiny GPT-2 and synthetic dialogues."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import batches_per_epoch, config_for, read_jsonl
from transformers import TrainerCallback

from gpt2ft.checkpoints import COMPLETE_MARKER, check_output_dir, checkpoint_dir, clean_stale_folders, save_final_model
from gpt2ft.cli import main
from gpt2ft.config import TrainConfig
from gpt2ft.errors import TrainingError
from gpt2ft.evaluation import evaluate_dialogs, recompute_loss_from_dump
from gpt2ft.generate import build_generation_config
from gpt2ft.modeling import Hardware, choose_precision, device_precision
from gpt2ft.training import build_training_args

METRIC_KEYS = {
    "train_loss",
    "eval_loss",
    "eval_perplexity",
    "train_runtime_s",
    "train_tokens",
    "train_tokens_per_s",
    "epochs",
    "steps",
    "train_dialogs",
    "eval_dialogs",
}


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def test_train_prints_and_writes_the_metrics(trained, tiny_model_dir, dailydialog_dir, tmp_path):
    dirs, printed = trained
    assert METRIC_KEYS <= set(printed)
    saved = json.loads(Path(dirs["logs"], "metrics.json").read_text())
    assert saved["eval_loss"] == printed["eval_loss"]
    assert math.isclose(saved["eval_perplexity"], math.exp(saved["eval_loss"]))
    assert saved["epochs"] == 3 and saved["train_tokens"] > 0
    assert saved["steps"] == 3 * batches_per_epoch(tiny_model_dir, dailydialog_dir, 8, tmp_path)
    assert saved["train_tokens_per_s"] == pytest.approx(saved["train_tokens"] / saved["train_runtime_s"])


def test_one_log_holds_each_step_once_and_the_train_loss_is_their_mean(trained):
    dirs, printed = trained
    assert not Path(dirs["logs"], "log_history.jsonl").exists()  # one log, not two copies of the same records
    records = read_jsonl(Path(dirs["logs"], "train_log.jsonl"))
    steps = [record["step"] for record in records if "loss" in record]
    assert steps == list(range(1, printed["steps"] + 1))
    # --logging-steps 1: each logged loss is one step's loss, so the run's train_loss is exactly their mean.
    losses = [record["loss"] for record in records if "loss" in record]
    assert printed["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    summary = [record for record in records if "train_runtime" in record]
    assert len(summary) == 1 and summary[0]["train_loss"] == pytest.approx(printed["train_loss"])
    assert summary[0]["tokens_seen"] == printed["train_tokens"]


def test_train_tokens_count_targets_not_padding(trained, tiny_tokenizer):
    dirs, printed = trained

    # 3 epochs over the training rows: every target token counted once an epoch.
    from gpt2ft.data import read_rows

    cached = next(Path(dirs["cache"], "tokenized").iterdir())
    rows = read_rows(cached, "train")
    assert printed["train_tokens"] == 3 * sum(rows["n_targets"])


def test_saved_folder_loads_with_plain_transformers(trained):
    dirs, _ = trained
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    output = Path(dirs["output"])
    assert (output / "model.safetensors").is_file()
    assert not list(output.glob("*.bin"))
    assert not checkpoint_dir(output).exists()  # removed after a successful run
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    generation = GenerationConfig.from_pretrained(output)
    assert generation.eos_token_id == tokenizer.eos_token_id == generation.pad_token_id
    assert generation.do_sample and 40 <= generation.max_new_tokens <= 60
    saved = json.loads((output / "training_config.json").read_text())
    assert saved["config"]["epochs"] == 3 and "gpt2ft_version" in saved
    assert model.config.model_type == "gpt2"
    # llama.cpp's converter reads n_ctx; transformers still loads the config, with its KV cache on for generation.
    raw = json.loads((output / "config.json").read_text())
    assert raw["n_ctx"] == raw["n_positions"] == 256
    assert AutoConfig.from_pretrained(output).use_cache is True


def test_eval_matches_training_and_dump_reproduces_the_loss(trained, dailydialog_dir, tmp_path, capsys):
    dirs, printed = trained
    dump = tmp_path / "dump.jsonl"
    code = main(
        [
            "eval",
            "--model",
            dirs["output"],
            "--data",
            str(dailydialog_dir),
            "--split",
            "validation",
            "--cache-dir",
            dirs["cache"],
            "--dump-tokens",
            str(dump),
        ]
    )
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
    assert (
        main(["generate", "--model", dirs["output"], "--greedy", "--max-new-tokens", "8", "Hello, how are you?"]) == 0
    )
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


def fresh_save(output: Path, tiny_model, tiny_tokenizer, version: str) -> None:
    save_final_model(
        tiny_model, tiny_tokenizer, build_generation_config(tiny_tokenizer), {"gpt2ft_version": version}, output
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


class Boom(RuntimeError):
    pass


def fail_rename_number(monkeypatch, number: int, error: type[BaseException]) -> None:
    """Make the `number`-th Path.rename from now on raise `error` (the swap's renames: 1 = old aside, 2 = new in)."""
    real = Path.rename
    calls = {"n": 0}

    def rename(self, target):
        calls["n"] += 1
        if calls["n"] == number:
            raise error("injected")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


SAVE_FAILURES = {
    "writing the model": lambda m, model, tok: m.setattr(
        model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(Boom("disk full"))
    ),
    "writing the tokenizer": lambda m, model, tok: m.setattr(
        tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(Boom("disk full"))
    ),
    "writing training_config.json": lambda m, model, tok: m.setattr(
        "gpt2ft.checkpoints.write_json", lambda *a, **k: (_ for _ in ()).throw(Boom("disk full"))
    ),
    "moving the old model aside": lambda m, model, tok: fail_rename_number(m, 1, Boom),
    "moving the new model in": lambda m, model, tok: fail_rename_number(m, 2, Boom),
    "Ctrl-C between the renames": lambda m, model, tok: fail_rename_number(m, 2, KeyboardInterrupt),
}


@pytest.mark.parametrize("step", list(SAVE_FAILURES))
def test_a_failure_at_each_step_of_the_final_save_keeps_the_old_model_and_every_checkpoint(
    step, tmp_path, tiny_model, tiny_tokenizer, monkeypatch
):
    output = tmp_path / "model"
    fresh_save(output, tiny_model, tiny_tokenizer, "old")
    before = snapshot(output)
    checkpoints = checkpoint_dir(output)
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    kept_checkpoints = snapshot(checkpoints)

    with monkeypatch.context() as patch:
        SAVE_FAILURES[step](patch, tiny_model, tiny_tokenizer)
        with pytest.raises((Boom, KeyboardInterrupt)):
            fresh_save(output, tiny_model, tiny_tokenizer, "new")
    assert snapshot(output) == before  # the previous model, byte for byte
    assert snapshot(checkpoints) == kept_checkpoints  # every checkpoint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    fresh_save(output, tiny_model, tiny_tokenizer, "new")  # and the next save works
    assert json.loads((output / "training_config.json").read_text())["gpt2ft_version"] == "new"


def test_a_killed_save_is_tidied_at_the_next_start(tmp_path, tiny_model, tiny_tokenizer):
    output = tmp_path / "model"
    fresh_save(output, tiny_model, tiny_tokenizer, "old")
    before = snapshot(output)
    # SIGKILL between the two renames: the old model aside, a complete new one still in staging, no output folder.
    output.rename(tmp_path / ".model.old-999")
    (tmp_path / ".model.partial-999").mkdir()
    (tmp_path / ".model.partial-999" / "config.json").write_text("{}")
    (tmp_path / ".model.partial-123").mkdir()
    removed = clean_stale_folders(output)
    assert snapshot(output) == before  # the previous model is back
    assert {p.name for p in removed} == {".model.partial-999", ".model.partial-123"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_evaluation_outside_training_follows_the_training_precision_rule(monkeypatch, tiny_model, tiny_tokenizer):
    import gpt2ft.evaluation as evaluation

    def gpu(name, major, minor):
        return lambda device=None: SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", gpu("NVIDIA A100", 8, 0))
    assert device_precision("cuda") == "bf16"  # not fp16: the same rule as training (choose_precision)
    monkeypatch.setattr(torch.cuda, "get_device_properties", gpu("Tesla T4", 7, 5))
    assert device_precision("cuda") == "fp16"
    assert device_precision("cpu") == "fp32"
    # eval, compare and the notebook score through evaluate_dialogs, which asks that rule for the model's device.
    seen = {}
    monkeypatch.setattr(evaluation, "device_precision", lambda device: "bf16")
    monkeypatch.setattr(
        evaluation,
        "evaluate_loss",
        lambda *args, **kwargs: seen.update(precision=args[5]) or {"loss": 1.0, "perplexity": math.e, "tokens": 1},
    )
    from gpt2ft.data import dialogs_dataset

    evaluate_dialogs(tiny_model, tiny_tokenizer, dialogs_dataset([["Hi.", "Hello."]]))
    assert seen["precision"] == "bf16"


def test_training_args_never_halve_the_batch_behind_the_users_back(tmp_path):
    args = build_training_args(TrainConfig(), "fp16", Hardware("cuda", "Tesla T4", (7, 5), 15.0), tmp_path)
    assert args.auto_find_batch_size is False
    assert args.restore_callback_states_from_checkpoint is True  # the run totals come back with a checkpoint


class OutOfMemoryAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return control


def test_out_of_memory_stops_with_the_settings_that_fit(tiny_model_dir, dailydialog_dir, run_dirs):
    from gpt2ft.training import train

    config = config_for(
        tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "3", "--gradient-accumulation-steps", "2"
    )
    with pytest.raises(TrainingError) as raised:
        train(config, callbacks=[OutOfMemoryAt()])
    message = str(raised.value)
    assert "out of GPU memory" in message and "--batch-size 4 --gradient-accumulation-steps 4" in message
    assert not Path(run_dirs["output"], "model.safetensors").exists()


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
    assert not args.accelerator_config.non_blocking and not args.dataloader_pin_memory  # nothing to pin on a CPU
    padded = build_training_args(
        TrainConfig(batching="pad"), "fp16", Hardware("cuda", "Tesla T4", (7, 5), 15.0), tmp_path
    )
    assert padded.fp16 and not padded.bf16
    assert padded.optim == "adamw_torch_fused"
    # On a GPU, batches are copied from pinned memory without the host waiting, by workers that start once.
    assert padded.accelerator_config.non_blocking and padded.dataloader_pin_memory
    assert padded.dataloader_num_workers == 2 and padded.dataloader_persistent_workers
