"""Never lose a run, never crash on bad input: resume, bad-input table, a full disk, hostile models and templates,
NaN guard, safe loading."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    Crash,
    CrashAt,
    PoisonWeights,
    assert_same_weights,
    batches_per_epoch,
    config_for,
    crash_during_final_save,
    default_splits,
    make_conversations,
    read_jsonl,
    train_argv,
    write_conversations,
    write_layout,
)
from safetensors.torch import load_file, save_file

from gpt2ft.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_dir,
    complete_checkpoints,
    find_resume_checkpoint,
    save_final_model,
)
from gpt2ft.cli import main
from gpt2ft.errors import TrainingError
from gpt2ft.generate import build_generation_config
from gpt2ft.training import train

# --------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem, exit code 2, no traceback, output folder untouched
# --------------------------------------------------------------------------------------------------------------


def data_with(tmp_path: Path, change) -> Path:
    """Synthetic extracted-layout data with one defect applied by `change(root)`."""
    root = write_layout(tmp_path / "bad_data", "extracted", default_splits(12, 4))
    change(root)
    return root


def replace_in(path: Path, old: bytes, new: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, new, 1))


def append_line(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def make_model_variant(tmp_path: Path, tiny_model_dir: Path, change) -> Path:
    folder = tmp_path / "bad_model"
    shutil.copytree(tiny_model_dir, folder)
    change(folder)
    return folder


def set_model_type(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))


def pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def corrupt_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


def unreadable_file(root: Path) -> None:
    target = root / "train" / "dialogues_train.txt"
    target.unlink()
    target.mkdir()  # a folder where a file should be: unreadable even for root


def zips_without_members(tmp_path: Path) -> Path:
    root = write_layout(tmp_path / "bad_zips", "split_zips", default_splits(12, 4))
    with zipfile.ZipFile(root / "train.zip", "w") as archive:
        archive.writestr("train/readme.txt", "no dialogues here")
    return root


# (case id, how to break the data or model or flags, text the one-line error must contain)
BAD_INPUTS = [
    ("missing data path", {"data": lambda tmp, m: tmp / "nowhere"}, "nowhere: no such file or folder"),
    (
        "unreadable data file",
        {"data": lambda tmp, m: data_with(tmp, unreadable_file)},
        "dialogues_train.txt: cannot read",
    ),
    (
        "zip without expected members",
        {"data": lambda tmp, m: zips_without_members(tmp)},
        "missing member train/dialogues_train.txt",
    ),
    (
        "empty line in dialogues",
        {
            "data": lambda tmp, m: data_with(
                tmp, lambda r: append_line(r / "train" / "dialogues_train.txt", "\nA . __eou__\n")
            )
        },
        "dialogues_train.txt:13: empty line",
    ),
    (
        "line without __eou__",
        {
            "data": lambda tmp, m: data_with(
                tmp,
                lambda r: (
                    replace_in(
                        r / "validation" / "dialogues_validation.txt",
                        b" __eou__",
                        b"",
                    )
                    or replace_in(r / "validation" / "dialogues_validation.txt", b" __eou__\n", b"\n")
                ),
            )
        },
        "dialogues_validation.txt:1: no '__eou__'",
    ),
    (
        "act file with a different number of lines",
        {"data": lambda tmp, m: data_with(tmp, lambda r: append_line(r / "test" / "dialogues_act_test.txt", "1 2\n"))},
        "dialogues_act_test.txt: has 5 lines but",
    ),
    (
        "non-UTF-8 bytes",
        {
            "data": lambda tmp, m: data_with(
                tmp, lambda r: replace_in(r / "train" / "dialogues_train.txt", b"?", b"\xff")
            )
        },
        "not UTF-8",
    ),
    (
        "only some splits",
        {"data": lambda tmp, m: data_with(tmp, lambda r: shutil.rmtree(r / "test"))},
        "no test",
    ),
    (
        "unsupported model folder",
        {"model": lambda tmp, m: make_model_variant(tmp, m, lambda f: set_model_type(f, "bert"))},
        "model_type 'bert'",
    ),
    (
        "model folder without config",
        {"model": lambda tmp, m: make_model_variant(tmp, m, lambda f: (f / "config.json").unlink())},
        "no config.json",
    ),
    ("pickle-only weights", {"model": lambda tmp, m: make_model_variant(tmp, m, pickle_only)}, "only pickle weights"),
    ("corrupt weights", {"model": lambda tmp, m: make_model_variant(tmp, m, corrupt_weights)}, "cannot load the model"),
    ("missing model folder", {"model": lambda tmp, m: tmp / "no_model" / "here"}, "no such model folder"),
    ("negative epochs", {"flags": ["--epochs", "-1"]}, "--epochs"),
    ("zero batch size", {"flags": ["--batch-size", "0"]}, "--batch-size"),
    ("learning rate of zero", {"flags": ["--learning-rate", "0"]}, "--learning-rate"),
    ("negative learning rate", {"flags": ["--learning-rate", "-1e-4"]}, "--learning-rate"),
    (
        "max length above the context",
        {"flags": ["--max-length", "4096"]},
        "--max-length 4096: exceeds the model's context of 256",
    ),
    ("not a number", {"flags": ["--epochs", "three"]}, "--epochs"),
    ("unknown flag", {"flags": ["--epoch", "3"]}, "unrecognized arguments: --epoch"),
    ("bad loss-on choice", {"flags": ["--loss-on", "some"]}, "--loss-on"),
    ("missing config file", {"flags": ["--config", "/nonexistent/run.json"]}, "--config: file not found"),
    ("bad optimizer", {"flags": ["--optim", "sgd_turbo"]}, "--optim"),
]


@pytest.mark.parametrize("case, breaks, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line(
    case, breaks, message, tmp_path, tiny_model_dir, dailydialog_dir, run_dirs, capsys
):
    model = breaks["model"](tmp_path, tiny_model_dir) if "model" in breaks else tiny_model_dir
    data = breaks["data"](tmp_path, tiny_model_dir) if "data" in breaks else dailydialog_dir
    code = main(train_argv(model, data, run_dirs, "--max-steps", "1", *breaks.get("flags", [])))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    assert not Path(run_dirs["output"]).exists()  # no output folder created


def test_foreign_output_folder_is_refused_and_left_unchanged(tiny_model_dir, dailydialog_dir, run_dirs, capsys):
    output = Path(run_dirs["output"])
    output.mkdir()
    (output / "thesis.txt").write_text("do not touch")
    code = main(train_argv(tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--output-dir" in err[0] and "--overwrite" in err[0]
    assert [p.name for p in output.iterdir()] == ["thesis.txt"]


def test_misaligned_labels_are_skipped_and_reported(tmp_path, tiny_model_dir, run_dirs, capsys):
    def break_labels(root):
        lines = (root / "train" / "dialogues_act_train.txt").read_text().splitlines()
        lines[2] += " 1"
        (root / "train" / "dialogues_act_train.txt").write_text("\n".join(lines) + "\n")

    data = data_with(tmp_path, break_labels)
    assert main(train_argv(tiny_model_dir, data, run_dirs, "--max-steps", "1")) == 0
    assert "dialogues_train.txt:3:" in capsys.readouterr().err
    metrics = json.loads(Path(run_dirs["logs"], "metrics.json").read_text())
    assert len(metrics["skipped_lines"]) == 1 and "dialogues_train.txt:3" in metrics["skipped_lines"][0]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def run_gpt2ft(*argv: str, stdin: str = "", timeout: float = 180) -> tuple[int, list[str]]:
    """`python -m gpt2ft ...` in a child process (its whole stderr is seen, whatever wrote it): the exit code and the
    stderr lines. `timeout` is a guard against a hang, not a measurement."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gpt2ft", *argv], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def non_utf8_file(folder: Path, suffix: str) -> Path:
    """Ten conversations as JSON Lines (or a JSON array) with one 0xff byte inside a reply of the 7th record."""
    path = write_conversations(folder / f"chats{suffix}", make_conversations(10, 0))
    lines = path.read_bytes().split(b"\n") if suffix == ".jsonl" else None
    if lines is not None:
        lines[6] = lines[6].replace(b"content", b"cont\xffent", 1)
        path.write_bytes(b"\n".join(lines))
    else:
        text = path.read_bytes()
        at = text.index(b"content", len(text) // 2)
        path.write_bytes(text[:at] + b"\xff" + text[at:])
    return path


@pytest.mark.parametrize("command", ["train", "prefer"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_data_file_with_bytes_that_are_not_utf8_is_one_line_with_its_line_and_offset(
    command, suffix, tmp_path, tiny_model_dir, run_dirs, capsys
):
    data = non_utf8_file(tmp_path, suffix)
    offset = data.read_bytes().index(b"\xff")
    line = data.read_bytes()[:offset].count(b"\n") + 1
    argv = train_argv(tiny_model_dir, data, run_dirs, "--max-steps", "1")
    if command == "prefer":
        argv = ["prefer", *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{data}:{line}: not UTF-8 text (byte 0xff at offset {offset})" in lines[0]


# --------------------------------------------------------------------------------------------------------------
# A full disk while saving: one line naming the folder and the space needed; nothing complete is lost
# --------------------------------------------------------------------------------------------------------------


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def fill_disk_at(monkeypatch, where: str) -> None:
    """Make one write raise ENOSPC, as a full disk does: the weights of checkpoint-4, the final model's weights, or
    logs/metrics.json."""
    import transformers.modeling_utils

    save_file = transformers.modeling_utils.safe_save_file
    write_text = Path.write_text

    def saving(tensors, filename, *args, **kwargs):
        folder = Path(filename).parent.name
        if (where == "checkpoint" and folder == "checkpoint-4") or (where == "model" and ".partial-" in folder):
            Path(filename).write_bytes(b"\0" * 1024)  # what a write cut short leaves
            raise disk_full()
        return save_file(tensors, filename, *args, **kwargs)

    def writing(self, *args, **kwargs):
        if where == "metrics" and "metrics.json" in self.name:
            raise disk_full()
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", saving)
    monkeypatch.setattr(Path, "write_text", writing)


@pytest.mark.parametrize(
    "where, folder, says",
    [
        ("checkpoint", "output.checkpoints", "writing checkpoint-4 needs about"),
        ("model", "output", "writing the model needs about"),
        ("metrics", "logs", "writing metrics.json needs about"),
    ],
)
def test_a_full_disk_is_one_line_and_keeps_the_previous_model_and_the_checkpoints(
    where, folder, says, tmp_path, tiny_model, tiny_tokenizer, tiny_model_dir, dailydialog_dir, monkeypatch, capsys
):
    dirs = dirs_in(tmp_path)
    previous = save_final_model(
        tiny_model, tiny_tokenizer, build_generation_config(tiny_tokenizer), {"gpt2ft_version": "t"}, dirs["output"]
    )
    before = {path.name: path.read_bytes() for path in previous.iterdir()}
    argv = train_argv(tiny_model_dir, dailydialog_dir, dirs, "--max-steps", "4", "--eval-steps", "2")
    with monkeypatch.context() as patch:
        fill_disk_at(patch, where)
        assert main(argv) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"error: {tmp_path / folder}: no space left on its disk: {says} ") and "free" in line
    assert {path.name: path.read_bytes() for path in previous.iterdir()} == before  # the previous model, intact
    assert not list(tmp_path.glob(".output.*"))  # no staging folder left behind
    kept = [path.name for path in complete_checkpoints(checkpoint_dir(dirs["output"]))]
    assert kept == (["checkpoint-2"] if where == "checkpoint" else ["checkpoint-2", "checkpoint-4"])
    assert [path.name for path in checkpoint_dir(dirs["output"]).iterdir()] == kept  # the half-written one removed
    if where == "checkpoint":
        assert "the last complete checkpoint, checkpoint-2, is kept" in line
    if where == "model":
        assert main(argv) == 0  # space freed: the same command resumes from checkpoint-4 and saves the model
        assert json.loads(Path(dirs["logs"], "metrics.json").read_text())["steps"] == 4


# --------------------------------------------------------------------------------------------------------------
# Hostile or broken model folders and chat templates: one line, exit 2, in seconds
# --------------------------------------------------------------------------------------------------------------


def model_with_template(tmp_path: Path, tiny_model_dir: Path, template: str) -> Path:
    folder = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


TURNS = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
FAILING_TEMPLATES = {
    "raise_exception": "{{ raise_exception('this template refuses every conversation') }}" + TURNS,
    "sandbox refusal": "{{ messages.__class__.__mro__[1].__subclasses__() }}" + TURNS,
}


@pytest.mark.parametrize("template", list(FAILING_TEMPLATES))
@pytest.mark.parametrize("command", ["chat", "generate", "eval", "train"])
def test_a_chat_template_that_fails_is_one_line_in_every_command(
    command, template, tmp_path, tiny_model_dir, dailydialog_dir, run_dirs, capsys, monkeypatch
):
    model = model_with_template(tmp_path, tiny_model_dir, FAILING_TEMPLATES[template])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    argv = {
        "chat": ["chat", "--model", str(model)],
        "generate": ["generate", "--model", str(model), "Hello"],
        "eval": ["eval", "--model", str(model), "--data", str(dailydialog_dir), "--cache-dir", run_dirs["cache"]],
        "train": train_argv(model, dailydialog_dir, run_dirs, "--max-steps", "1"),
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"--model {model}: its chat template cannot render the conversation" in lines[0]


def test_a_template_that_fails_on_one_conversation_is_one_line_in_chat(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The probe at loading passes (no system message); the conversation `chat --system` starts does not."""
    model = model_with_template(
        tmp_path,
        tiny_model_dir,
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + TURNS,
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(model), "--system", "Be brief."]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"error: --model {model}: its chat template cannot render the conversation "
        "(TemplateError: System role not supported)"
    ]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["chat", "train"])
def test_a_template_that_renders_forever_is_refused_in_seconds(command, tmp_path, tiny_model_dir, dailydialog_dir):
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 10**10 iterations
    model = model_with_template(tmp_path, tiny_model_dir, loop + TURNS)
    argv = (
        ["chat", "--model", str(model)] if command == "chat" else train_argv(model, dailydialog_dir, dirs_in(tmp_path))
    )
    code, lines = run_gpt2ft(*argv, stdin="Hello\n")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"error: --model {model}: its chat template takes more than 2 s to render a three-message conversation "
        "(a runaway loop?); fix the template (chat_template.jinja)"
    )


@pytest.mark.parametrize("command", ["chat", "train"])
def test_a_config_of_absurd_size_is_refused_in_seconds(command, tmp_path, tiny_model_dir, dailydialog_dir):
    model = make_model_variant(tmp_path, tiny_model_dir, lambda f: None)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_layer": 100_000, "n_embd": 1_000_000}))
    argv = (
        ["chat", "--model", str(model)] if command == "chat" else train_argv(model, dailydialog_dir, dirs_in(tmp_path))
    )
    code, lines = run_gpt2ft(*argv, stdin="Hello\n")
    assert code == 2 and len(lines) == 1, lines
    assert f"--model {model}: config.json describes" in lines[0] and "parameters, beyond any machine" in lines[0]


def drop_a_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("transformer.h.0.attn.c_proj.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def misshape_a_tensor(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 5)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "command, breaks, message",
    [
        ("generate", drop_a_tensor, "the weights lack tensors config.json needs: transformer.h.0.attn.c_proj.weight"),
        (
            "train",
            misshape_a_tensor,
            "the weights do not fit config.json: transformer.h.0.attn.c_attn.weight has shape (3, 5) in the weights "
            "and (32, 96) in the config",
        ),
    ],
)
def test_a_broken_model_folder_is_exactly_one_stderr_line(
    command, breaks, message, tmp_path, tiny_model_dir, dailydialog_dir
):
    """Not transformers' load report (a table of every tensor) before gpt2ft's line, nor random weights where one is
    missing: only gpt2ft's line."""
    model = make_model_variant(tmp_path, tiny_model_dir, breaks)
    argv = ["generate", "--model", str(model), "Hello"]
    if command == "train":
        argv = train_argv(model, dailydialog_dir, dirs_in(tmp_path), "--max-steps", "1")
    code, lines = run_gpt2ft(*argv)
    assert code == 2 and lines == [f"error: --model {model}: {message}"]


# --------------------------------------------------------------------------------------------------------------
# NaN guard
# --------------------------------------------------------------------------------------------------------------


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tiny_model_dir, dailydialog_dir, run_dirs):
    config = config_for(tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "12", "--eval-steps", "2")
    with pytest.raises(TrainingError) as raised:
        train(config, callbacks=[PoisonWeights(at=5)])
    message = str(raised.value)
    assert "step 6" in message and "NaN" in message and "--learning-rate" in message
    checkpoints = complete_checkpoints(checkpoint_dir(run_dirs["output"]))
    assert checkpoints[-1].name == "checkpoint-4"  # nothing saved from the poisoned steps
    assert checkpoints[-1].as_posix() in message
    assert not Path(run_dirs["output"], "model.safetensors").exists()  # no final model from a broken run


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------


def loss_steps(log_path: Path) -> list[int]:
    return [record["step"] for record in read_jsonl(log_path) if "loss" in record]


WHOLE_RUN_EXACT = ("train_tokens", "steps", "epochs", "train_dialogs", "train_rows")
WHOLE_RUN_CLOSE = ("train_loss", "eval_loss", "test_loss")


def dirs_in(root: Path) -> dict[str, str]:
    return {name: str(root / name) for name in ("output", "logs", "images", "cache")}


def assert_same_run(resumed: dict, reference: dict) -> None:
    for key in WHOLE_RUN_EXACT:
        assert resumed[key] == reference[key], key
    for key in WHOLE_RUN_CLOSE:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-3), key


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, dailydialog_dir):
    flags = ("--max-steps", "12", "--eval-steps", "4", "--keep-checkpoints")
    reference = train(config_for(tiny_model_dir, dailydialog_dir, dirs_in(tmp_path / "straight"), *flags))

    dirs = dirs_in(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(config_for(tiny_model_dir, dailydialog_dir, dirs, *flags), callbacks=[CrashAt(at=6)])
    assert [p.name for p in complete_checkpoints(checkpoint_dir(dirs["output"]))] == ["checkpoint-4"]
    stored = json.loads((checkpoint_dir(dirs["output"]) / "checkpoint-4" / "trainer_state.json").read_text())
    first_segment = stored["stateful_callbacks"]["RunTotals"]["args"]["seconds"]  # the totals travel in the state
    resumed = train(config_for(tiny_model_dir, dailydialog_dir, dirs, *flags))

    assert resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.metrics["steps"] == 12
    assert_same_run(resumed.metrics, reference.metrics)
    assert loss_steps(Path(dirs["logs"], "train_log.jsonl")) == list(range(1, 13))  # no gap, no repeat
    # The run's training time: the first segment's up to its checkpoint (stored in it) plus the second segment's.
    step_5 = next(r for r in read_jsonl(Path(dirs["logs"], "train_log.jsonl")) if r.get("step") == 5 and "loss" in r)
    assert 0 < first_segment < step_5["train_seconds"] < resumed.metrics["train_runtime_s"]  # it went on, not from 0
    saved = json.loads(Path(dirs["logs"], "metrics.json").read_text())
    assert saved["train_tokens"] == reference.metrics["train_tokens"]  # what metrics.json says, too
    card = Path(dirs["output"], "README.md").read_text()
    assert f"{reference.metrics['train_tokens']:,}" in card  # and the model card


def test_a_kill_while_saving_the_model_mid_epoch_resumes_to_the_uninterrupted_run(
    tmp_path, tiny_model_dir, dailydialog_dir, monkeypatch
):
    """The last checkpoint is the last step's, mid-epoch: killed (twice) while writing the model, the same command
    takes no further step, and ends with the uninterrupted run's steps, tokens and weights."""
    flags = ("--max-steps", "7", "--eval-steps", "4", "--keep-checkpoints")
    assert 7 % batches_per_epoch(tiny_model_dir, dailydialog_dir, 8, tmp_path / "count") != 0  # mid-epoch
    reference = train(config_for(tiny_model_dir, dailydialog_dir, dirs_in(tmp_path / "straight"), *flags))
    dirs = dirs_in(tmp_path / "killed")
    config = config_for(tiny_model_dir, dailydialog_dir, dirs, *flags)
    with monkeypatch.context() as patch:
        crash_during_final_save(patch)
        for _ in range(2):
            with pytest.raises(Crash):
                train(config)
            assert complete_checkpoints(checkpoint_dir(dirs["output"]))[-1].name == "checkpoint-7"
            assert not Path(dirs["output"]).exists()
    resumed = train(config)
    assert resumed.resumed_from.endswith("checkpoint-7")
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 7
    assert_same_run(resumed.metrics, reference.metrics)
    assert loss_steps(Path(dirs["logs"], "train_log.jsonl")) == list(range(1, 8))
    assert_same_weights(dirs["output"], Path(tmp_path / "straight" / "output"))


def write_checkpoint(folder: Path, step: int, complete: bool, run: dict | None = None) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    if complete:
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": step, "run": run or {"learning_rate": 5e-5}}))
    return checkpoint


def test_resume_never_and_explicit_path(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        write_checkpoint(folder, step, complete)
    settings = {"learning_rate": 5e-5}
    assert find_resume_checkpoint(folder, "never", settings) is None
    assert find_resume_checkpoint(folder, "auto", settings) == str(
        folder / "checkpoint-4"
    )  # the half-written 6 is skipped
    assert find_resume_checkpoint(folder, str(folder / "checkpoint-2"), settings) == str(folder / "checkpoint-2")
    with pytest.raises(TrainingError, match="--resume"):
        find_resume_checkpoint(folder, str(tmp_path), settings)


def test_a_checkpoint_of_other_settings_is_refused_with_each_difference_and_the_ways_out(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(
        folder,
        4,
        True,
        {
            "learning_rate": 5e-5,
            "batch_size": 16,
            "seed": 42,
            "data_dialogs": {"train": 100},
            "max_train_dialogs": None,
        },
    )
    new = {"learning_rate": 1e-4, "batch_size": 8, "seed": 42, "data_dialogs": {"train": 90}, "max_train_dialogs": 90}
    with pytest.raises(TrainingError) as raised:
        find_resume_checkpoint(folder, "auto", new)
    message = str(raised.value)
    assert "\n" not in message
    assert "learning_rate 5e-05 -> 0.0001" in message and "batch_size 16 -> 8" in message and "data_dialogs" in message
    assert "seed" not in message  # unchanged settings are not listed
    assert "--learning-rate 5e-05" in message and "--batch-size 16" in message and "--resume never" in message
    assert "without --max-train-dialogs" in message  # a setting that was unset comes back by leaving its flag out


def test_settings_that_may_change_on_resume_are_allowed(tmp_path, tiny_model_dir, dailydialog_dir):
    dirs = dirs_in(tmp_path)
    flags = ("--max-steps", "8", "--eval-steps", "4")
    with pytest.raises(Crash):
        train(config_for(tiny_model_dir, dailydialog_dir, dirs, *flags), callbacks=[CrashAt(at=5)])
    changed = ("--logging-steps", "3", "--eval-batch-size", "4", "--report-to", "none", "--system-interval-s", "1")
    result = train(config_for(tiny_model_dir, dailydialog_dir, dirs, *flags, *changed))
    assert result.resumed_from.endswith("checkpoint-4") and result.metrics["steps"] == 8


def test_resume_after_sigkill(tmp_path, tiny_model_dir, dailydialog_dir, capsys):
    flags = ("--max-steps", "40", "--eval-steps", "10", "--save-total-limit", "1")
    reference = train(config_for(tiny_model_dir, dailydialog_dir, dirs_in(tmp_path / "straight"), *flags))
    dirs = dirs_in(tmp_path / "killed")
    argv = train_argv(tiny_model_dir, dailydialog_dir, dirs, *flags)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt2ft", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = checkpoint_dir(dirs["output"])
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(checkpoints) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the child to write its first checkpoint, not timing anything
        assert process.poll() is None, "training finished before it could be killed"
        assert complete_checkpoints(checkpoints), "no checkpoint within the time limit"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not Path(dirs["output"], "model.safetensors").exists()
    # Half-written leftovers are possible after SIGKILL; make sure one is there and gets skipped.
    (checkpoints / "checkpoint-39").mkdir(exist_ok=True)
    killed_at = max(int(p.name.split("-")[1]) for p in complete_checkpoints(checkpoints))

    # The same command again, but with another learning rate: refused, naming the setting, nothing lost.
    capsys.readouterr()
    assert main([*argv, "--learning-rate", "1e-3"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(error) == 1 and "learning_rate" in error[0] and "--resume never" in error[0]
    assert complete_checkpoints(checkpoints)[-1].name == f"checkpoint-{killed_at}"

    # The same command: it continues, and the whole run's numbers are the uninterrupted run's.
    assert main(argv) == 0
    printed = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert printed["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert_same_run(printed, reference.metrics)
    assert (Path(dirs["output"]) / "model.safetensors").is_file()
    assert loss_steps(Path(dirs["logs"], "train_log.jsonl")) == list(range(1, 41))


# --------------------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------------------


def test_no_unsafe_loading_in_the_package():
    sources = {path: path.read_text() for path in (ROOT / "gpt2ft").glob("*.py")}
    for path, text in sources.items():
        assert "trust_remote_code=True" not in text, path
        assert "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line}"


# --------------------------------------------------------------------------------------------------------------
# The first hour: a typo, an offline Hub, the repository's files, stdout
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "eval", "chat", "train"])
def test_a_hub_id_neither_cached_nor_reachable_is_one_line_at_once(command, run_dirs, dailydialog_dir, capsys):
    """Offline (the tests' HF_HUB_OFFLINE=1, as on a machine without network) a Hub id not in the local cache used
    to cost a minute of the Hub client's retries and end in an error that never said the name is not a folder."""
    argv = {
        "generate": ["generate", "--model", "someone/not-here", "Hello"],
        "eval": ["eval", "--model", "someone/not-here", "--data", str(dailydialog_dir)],
        "chat": ["chat", "--model", "someone/not-here"],
        "train": train_argv("someone/not-here", dailydialog_dir, run_dirs),
    }[command]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "error: --model someone/not-here: not a local folder, and offline mode is on (HF_HUB_OFFLINE) (it is not in "
        "the local Hugging Face cache)"
    ]


def test_an_unreachable_hub_is_said_as_such(monkeypatch):
    from huggingface_hub import constants

    from gpt2ft import families

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(families, "hub_reachable", lambda endpoint, timeout=3.0: False)
    with pytest.raises(families.ModelError, match=r"^--base gpt2: not a local folder, and the Hub is unreachable"):
        families.check_model_source("gpt2", "--base")


def test_saving_into_the_repositorys_empty_model_folder_keeps_its_tracked_placeholder(tmp_path, tiny_model_dir):
    """The first `train` replaced gpt2_finetuned/ and with it the tracked gpt2_finetuned/.gitkeep."""
    from gpt2ft.generate import build_generation_config
    from gpt2ft.modeling import load_model_and_tokenizer

    output = tmp_path / "gpt2_finetuned"
    output.mkdir()
    (output / ".gitkeep").write_text("")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    for _ in range(2):  # the first save, and one over a model gpt2ft wrote
        save_final_model(model, tokenizer, build_generation_config(tokenizer), {"gpt2ft_version": "x"}, output)
        assert (output / ".gitkeep").is_file() and (output / "model.safetensors").is_file()


def test_stdout_of_a_run_is_progress_and_exactly_one_json_line(run_dirs, tiny_model_dir, dailydialog_dir, capsys):
    """A script reads the run's JSON from stdout: the Trainer's own log lines were Python dicts (`{'loss': '2.3'}`)
    that start like JSON and are not; now they are plain lines, and the one `{` line is the final JSON."""
    argv = train_argv(tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "3", "--max-train-dialogs", "16")
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    braces = [line for line in out if line.lstrip().startswith("{")]
    assert len(braces) == 1 and json.loads(braces[0])["steps"] == 3
    assert any(line.startswith("step 1/3: loss ") for line in out)
