"""GPT2_fine_tuning.ipynb and gpt2ft.notebook: the committed notebook's shape, its helpers, and one run of the
whole notebook with papermill (tiny model, synthetic DailyDialog, CPU).

    pytest tests/test_notebook.py
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import tomllib
from pathlib import Path

import nbformat
import pytest
import torch
from conftest import EXCHANGES

from gpt2ft.config import ConfigError, TrainConfig
from gpt2ft.notebook import (
    before_after_table,
    chat_in_notebook,
    comparison_table,
    describe_resume,
    describe_saved_model,
    environment_report,
    equivalent_command,
    format_turns,
    gpu_memory_report,
    in_colab,
    label_table,
    make_config,
    mount_drive,
    plot_token_lengths,
    push_model_to_hub,
    resolve_paths,
    score_replies,
    score_splits,
    show_charts,
    show_chat_format,
    show_replies,
    split_counts_table,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "GPT2_fine_tuning.ipynb"
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
COLAB_LINK = REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/") + (
    "/blob/main/GPT2_fine_tuning.ipynb"
)

# The issue's parameter names and defaults; the notebook may add more.
REQUIRED_PARAMETERS = {
    "model_name": "gpt2",
    "data_source": "hub",
    "output_dir": "gpt2_finetuned",
    "logs_dir": "logs",
    "images_dir": "images",
    "num_train_epochs": 3,
    "max_steps": -1,
    "max_train_dialogs": None,
    "max_eval_dialogs": None,
    "seed": 42,
    "use_drive": False,
    "cache_dir": "data",
    "chat_interactive": False,
    "push_to_hub": False,
    "hub_repo_id": None,
    "overwrite": False,
}
# Notebook parameter -> the TrainConfig field it sets: their defaults must agree, so defaults live in one place.
PARAMETER_FIELDS = {
    "model_name": "model",
    "data_source": "data",
    "output_dir": "output_dir",
    "logs_dir": "logs_dir",
    "images_dir": "images_dir",
    "cache_dir": "cache_dir",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "max_train_dialogs": "max_train_dialogs",
    "max_eval_dialogs": "max_eval_dialogs",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "logging_steps": "logging_steps",
    "seed": "seed",
    "overwrite": "overwrite",
}


# Parameters that are None by default, so the T4 presets may tune them for a large model.
LEFT_TO_GPT2FT = ("batch_size", "learning_rate")


# --------------------------------------------------------------------------------------------------------------
# The committed notebook
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def python_source(cell_source: str) -> str:
    """A cell's source as plain Python: IPython's `%magic` and `!shell` lines become `pass` (keeping the
    indentation, so an `if IN_COLAB:` block still parses)."""
    lines = []
    for line in cell_source.splitlines():
        stripped = line.lstrip()
        lines.append(line[: len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line)
    return "\n".join(lines)


def parameters_cell(notebook):
    tagged = [cell for cell in code_cells(notebook) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell must carry papermill's `parameters` tag"
    return tagged[0]


def parameter_values(notebook) -> dict:
    values = {}
    for node in ast.parse(parameters_cell(notebook).source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, (
            "the parameters cell holds only `name = literal` lines"
        )
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def test_committed_without_outputs_or_execution_counts(notebook):
    assert notebook.nbformat == 4
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert cell.outputs == [], cell.source[:60]
        assert cell.execution_count is None, cell.source[:60]
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_no_code_cell_defines_a_function_or_class(notebook):
    for cell in code_cells(notebook):
        tree = ast.parse(python_source(cell.source))
        defined = [
            node
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        ]
        assert not defined, f"cell defines {type(defined[0]).__name__}: {cell.source[:80]!r}"


def test_parameters_cell_has_the_issue_names_and_defaults(notebook):
    values = parameter_values(notebook)
    for name, default in REQUIRED_PARAMETERS.items():
        assert name in values, name
        assert values[name] == default and type(values[name]) is type(default), name


def test_parameter_defaults_agree_with_train_config(notebook):
    values, defaults = parameter_values(notebook), TrainConfig()
    for name, field in PARAMETER_FIELDS.items():
        if values[name] is None and name in LEFT_TO_GPT2FT:
            continue  # None: gpt2ft's default (or a T4 preset), not a second copy of it
        assert values[name] == getattr(defaults, field), (
            f"{name} = {values[name]!r} but TrainConfig.{field} = {getattr(defaults, field)!r}"
        )


def test_settings_the_presets_tune_are_left_to_gpt2ft_by_default(notebook):
    values = parameter_values(notebook)
    assert {name: values[name] for name in LEFT_TO_GPT2FT} == {"batch_size": None, "learning_rate": None}


def test_every_parameter_is_used_by_a_later_cell(notebook):
    cells = code_cells(notebook)
    start = cells.index(parameters_cell(notebook)) + 1
    used = {
        node.id
        for cell in cells[start:]
        for node in ast.walk(ast.parse(python_source(cell.source)))
        if isinstance(node, ast.Name)
    }
    assert set(parameter_values(notebook)) <= used, set(parameter_values(notebook)) - used


def test_a_markdown_cell_explains_each_code_cell(notebook):
    cells = notebook.cells
    assert cells[0].cell_type == "markdown"
    for previous, cell in zip(cells, cells[1:]):
        if cell.cell_type == "code":
            assert previous.cell_type == "markdown" and previous.source.strip(), (
                f"no explanation before {cell.source[:60]!r}"
            )


def test_title_cell_has_the_colab_badge_and_t4_estimates(notebook):
    title = notebook.cells[0].source
    assert title.startswith("# ")
    assert f"]({COLAB_LINK})" in title and "colab-badge.svg" in title
    assert "README" in title and "T4" in title and "estimate" in title.lower()


def test_colab_setup_installs_requirements_without_torch(notebook):
    setup = next(cell.source for cell in code_cells(notebook) if "git clone" in cell.source)
    assert "if IN_COLAB:" in setup and "%pip install -q -r requirements.txt" in setup
    for cell in code_cells(notebook):
        for line in cell.source.splitlines():
            assert not ("pip install" in line and "torch" in line), line


def test_the_label_table_is_introduced_as_the_token_itself_not_the_next_one(notebook):
    # Each label is the token at its own position (or -100); transformers shifts the labels by one inside the loss,
    # so the model predicts it from the tokens before it. "The token the model must predict at that position"
    # reads as the next token, which is what the logits there are scored against, not what the label column holds.
    cells = notebook.cells
    table = next(i for i, cell in enumerate(cells) if cell.cell_type == "code" and "label_table(" in cell.source)
    intro = " ".join(cells[table - 1].source.split())
    assert "must predict at that position" not in intro
    assert "the token at that position itself" in intro and "-100" in intro
    assert "from the tokens before it" in intro and "shifts the labels by one" in intro


def test_no_secret_is_written_into_the_notebook(notebook):
    text = "\n".join(cell.source for cell in notebook.cells)
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert "HF_TOKEN =" not in text and 'os.environ["HF_TOKEN"] =' not in text


# --------------------------------------------------------------------------------------------------------------
# gpt2ft.notebook helpers
# --------------------------------------------------------------------------------------------------------------


def test_resolve_paths_moves_relative_folders_to_drive(tmp_path):
    assert resolve_paths("gpt2_finetuned", "logs", "images") == {
        "output_dir": "gpt2_finetuned",
        "logs_dir": "logs",
        "images_dir": "images",
    }
    paths = resolve_paths("gpt2_finetuned", "/abs/logs", "images", drive_root=tmp_path)
    assert paths == {
        "output_dir": str(tmp_path / "gpt2_finetuned"),
        "logs_dir": "/abs/logs",
        "images_dir": str(tmp_path / "images"),
    }


def test_make_config_maps_the_notebook_names(tmp_path):
    config, chosen = make_config(
        "gpt2",
        "hub",
        "out",
        "logs",
        "images",
        "data",
        2,
        drive_root=tmp_path,
        max_train_dialogs=10,
        seed=7,
        batch_size=None,
    )
    assert (config.model, config.data, config.epochs, config.max_train_dialogs, config.seed) == (
        "gpt2",
        "hub",
        2.0,
        10,
        7,
    )
    assert config.output_dir == str(tmp_path / "out") and config.cache_dir == "data"
    assert config.batch_size == TrainConfig().batch_size and "batch_size" not in chosen  # None: left to gpt2ft
    assert {"max_train_dialogs", "seed", "epochs", "model"} <= chosen
    with pytest.raises(ConfigError, match="--epochs"):
        make_config("gpt2", "hub", "out", "logs", "images", "data", 0)


def test_equivalent_command_rebuilds_the_same_config():
    from gpt2ft.cli import build_parser, config_from_args

    config, _ = make_config(
        "./my model", "hub", "out", "logs", "images", "data", 1, max_train_dialogs=5, overwrite=True
    )
    config = config.replace(clean_text=False)
    command = equivalent_command(config)
    assert command.startswith("python -m gpt2ft train ")
    assert config_from_args(build_parser().parse_args(shlex.split(command)[3:]))[0] == config
    assert equivalent_command(TrainConfig()) == "python -m gpt2ft train"


def test_colab_helpers_outside_colab():
    assert in_colab() is False
    with pytest.raises(RuntimeError, match="Colab"):
        mount_drive()


def test_push_to_hub_is_opt_in(monkeypatch, tmp_path, capsys):
    assert push_model_to_hub(tmp_path, "me/model", enabled=False) is None
    assert "nothing was uploaded" in capsys.readouterr().out
    with pytest.raises(ValueError, match="hub_repo_id"):
        push_model_to_hub(tmp_path, None, enabled=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_login"))  # no token saved by `hf auth login` either
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        push_model_to_hub(tmp_path, "me/model", enabled=True)


@pytest.fixture
def plan(tiny_model_dir, dailydialog_dir, run_dirs):
    from conftest import config_for

    from gpt2ft.training import plan_run

    return plan_run(config_for(tiny_model_dir, dailydialog_dir, run_dirs, "--max-steps", "2", "--eval-batch-size", "4"))


def test_environment_and_memory_reports_on_this_machine(capsys, plan):
    report = environment_report(plan)
    assert {"torch", "transformers", "datasets", "device", "precision", "precision_reason"} <= set(report)
    assert report["precision"] == plan.precision
    memory = gpu_memory_report("after training", train_seconds=12.5)
    out = capsys.readouterr().out
    assert "precision" in out and "training time: 12.5 s" in out
    if not torch.cuda.is_available():
        assert report["precision"] == "fp32" and memory["device"] == "cpu" and "no GPU" in out


@pytest.mark.gpu
def test_gpu_memory_report_on_a_gpu():
    gpu_memory_report("before", reset_peak=True)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    report = gpu_memory_report("after", train_seconds=1.0)
    del block
    assert report["peak_reserved_gb"] >= 64 / 1024 and 0 < report["peak_share"] < 1 and report["total_gb"] > 1


def test_data_views(tiny_tokenizer, tmp_path, capsys):
    counts = {
        "train": {"release": 10, "removed": 2, "kept": 8, "used": 5},
        "validation": {"release": 3, "removed": 1, "kept": 2, "used": 2},
    }
    table = split_counts_table(counts)
    assert list(table.columns) == ["release", "removed", "kept", "used"] and table.loc["train", "removed"] == 2
    assert format_turns(["Hi.", "Hello.", "Bye."]) == "A: Hi.\nB: Hello.\nA: Bye."
    assert show_chat_format(["Hi.", "Hello."], tiny_tokenizer) == "<|endoftext|>Hi.<|endoftext|>Hello.<|endoftext|>"
    # A prepared record's messages, as the notebook passes them: plain turns (role "") read as A and B.
    record = [{"role": "", "content": "Hi.", "emotion": "no emotion", "act": "inform"}, {"role": "", "content": "Yo."}]
    assert format_turns(record) == "A: Hi.\nB: Yo."
    assert format_turns([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}]) == (
        "user: Hi.\nassistant: Yo."
    )
    assert show_chat_format(record, tiny_tokenizer) == "<|endoftext|>Hi.<|endoftext|>Yo.<|endoftext|>"
    chart = plot_token_lengths([5, 9, 12, 30], tmp_path / "images", limit=256)
    assert chart == tmp_path / "images" / "token_lengths.png" and chart.stat().st_size > 0
    assert "median 9, 99th percentile 30, longest 30" in capsys.readouterr().out


def test_label_table_marks_the_trained_tokens(tiny_tokenizer):
    from gpt2ft.data import dialogs_dataset, tokenize_dialogs

    turns = ["Hello, how are you?", "I am fine."]
    row = tokenize_dialogs(dialogs_dataset([turns]), tiny_tokenizer, 256)[0]
    table = label_table(row, tiny_tokenizer)
    assert list(table.columns) == ["token", "id", "label", "trained"]
    assert table["trained"].tolist() == ["no"] + ["yes"] * (len(table) - 1)
    assert (table.loc[table.trained == "yes", "label"] == table.loc[table.trained == "yes", "id"]).all()
    first_turn = len(tiny_tokenizer(turns[0], add_special_tokens=False)["input_ids"]) + 1
    responses = label_table(
        tokenize_dialogs(dialogs_dataset([turns]), tiny_tokenizer, 256, loss_on="responses")[0],
        tiny_tokenizer,
    )
    assert responses["trained"].tolist() == ["no"] * (1 + first_turn) + ["yes"] * (len(responses) - 1 - first_turn)
    assert len(label_table(row, tiny_tokenizer, limit=3)) == 3


def test_before_after_and_comparison_tables(capsys):
    before = {
        "base_eval_loss": 4.0,
        "base_eval_perplexity": math.exp(4.0),
        "base_eval_bits_per_byte": 1.5,
        "base_test_loss": 4.1,
        "base_test_perplexity": math.exp(4.1),
        "base_test_bits_per_byte": 1.6,
    }
    metrics = {"eval_loss": 2.0, "eval_perplexity": math.exp(2.0), "test_loss": 2.1, "test_perplexity": math.exp(2.1)}
    table = before_after_table(before, metrics)
    assert list(table.index) == ["validation", "test"]
    assert table.loc["test", "perplexity after"] == round(math.exp(2.1), 2)
    assert table.loc["validation", "times lower"] == round(math.exp(2.0), 2)
    assert table.loc["test", "bits/byte before"] == 1.6
    replies = {
        "samples": 2,
        "eos_rate": 0.5,
        "mean_reply_tokens": 7.0,
        "distinct_1": 0.9,
        "distinct_2": 1.0,
        "repeat_rate": 0.0,
    }
    text = comparison_table(before, replies, metrics, {**replies, "eos_rate": 1.0})
    lines = text.splitlines()
    assert lines[2].startswith(f"| before (base) | {math.exp(4.1):.2f} | 0.50 |") and lines[3].startswith(
        f"| after (fine-tuned) | {math.exp(2.1):.2f} | 1.00 |"
    )


def test_describe_resume_finds_a_complete_checkpoint_of_this_run(plan, capsys):
    from gpt2ft.checkpoints import COMPLETE_MARKER
    from gpt2ft.training import prepare_data, run_settings

    prepared = prepare_data(plan)
    assert describe_resume(plan, prepared) is None and "from scratch" in capsys.readouterr().out
    checkpoint = plan.checkpoint_dir / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "run": run_settings(plan, prepared)}))
    assert describe_resume(plan, prepared) == str(checkpoint) and "resumes from" in capsys.readouterr().out


def test_describe_saved_model_lists_every_file(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2048)
    assert [entry["file"] for entry in describe_saved_model(tmp_path)] == [
        "adapter/adapter_model.safetensors",
        "model.safetensors",
    ]


def test_show_charts_shows_what_it_is_given(tmp_path, capsys):
    from gpt2ft.charts import write_charts

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "learning_rate": 1e-4}) + "\n")
    paths = show_charts(write_charts(logs, tmp_path / "images"))
    assert len(paths) == 5 and all(path.is_file() for path in paths)
    assert show_charts([]) == [] and "No charts" in capsys.readouterr().out


def test_scoring_and_talking_with_a_tiny_model(plan, tiny_model, tiny_tokenizer, capsys):
    from gpt2ft.evaluation import evaluate_dialogs
    from gpt2ft.training import prepare_data, tokenize_data

    prepared = prepare_data(plan)
    rows = tokenize_data(plan, prepared, tiny_tokenizer)
    scores = score_splits(tiny_model, tiny_tokenizer, rows, plan, label="before")
    direct = evaluate_dialogs(tiny_model, tiny_tokenizer, prepared.dialogs["test"])
    assert (
        scores["base_test_loss"] == pytest.approx(direct["loss"])
        and "validation before: loss" in capsys.readouterr().out
    )

    replies = score_replies(tiny_model, tiny_tokenizer, prepared.dialogs["test"], samples=3, seed=0)
    assert replies["samples"] == 3 and len(replies["records"]) == 3 and 0 <= replies["eos_rate"] <= 1
    shown = show_replies(tiny_model, tiny_tokenizer, prepared.dialogs["test"], count=2, seed=0, max_new_tokens=5)
    out = capsys.readouterr().out
    from gpt2ft.notebook import showcase_dialogs

    showcase = score_replies(tiny_model, tiny_tokenizer, showcase_dialogs(prepared.dialogs["test"], 2), 2, seed=0)
    assert [record["context"] for record in shown] == [record["context"] for record in showcase["records"]]
    assert out.count("real:  ") == 2 and out.count("model: ") == 2

    replies = chat_in_notebook(
        tiny_model,
        tiny_tokenizer,
        lines=["Hello , how are you ?", "/reset", "What time is it ?", "/quit", "never read"],
        seed=0,
        max_new_tokens=5,
    )
    out = capsys.readouterr().out
    assert replies == 2
    assert (
        out.count("bot> ") == 2
        and "you> What time is it ?" in out
        and "(conversation reset)" in out
        and "never read" not in out
    )
    assert chat_in_notebook(tiny_model, tiny_tokenizer, lines=["Hi"], stream=False, greedy=True, max_new_tokens=5) == 1


def test_the_dialogues_shown_follow_one_fixed_rule(tiny_model, tiny_tokenizer, capsys):
    """The training conversation and the sample replies the notebook shows are the first dialogues of their split
    with 4 to 8 turns, none over 200 characters, and no word of SHOWCASE_AVOID, in the split's order."""
    from gpt2ft.data import dialogs_dataset
    from gpt2ft.notebook import is_showcase_dialog, show_example_dialog, showcase_dialogs

    dialogs = dialogs_dataset(
        [
            ["Hey man, you wanna buy some weed?", "Some what?", "Weed! You know? Pot!", "Oh, umm, no thanks."],
            ["Hi.", "Hello."],  # too short to read as an example
            ["Hi.", "Hello.", "x" * 201, "Bye."],  # a turn too long
            ["The taxi drivers are on strike again.", "What for?", "Cheaper gasoline.", "It is a hot potato."],
            ["Is it raining outside?", "No, it's sunny today.", "Great, let's walk.", "Sure.", "Bye!"],
        ]
    )
    assert [is_showcase_dialog(messages) for messages in dialogs["messages"]] == [False, False, False, True, True]
    assert [row["messages"][0]["content"] for row in showcase_dialogs(dialogs, 2)] == [
        "The taxi drivers are on strike again.",
        "Is it raining outside?",
    ]
    assert show_example_dialog(dialogs)[0]["content"] == "The taxi drivers are on strike again."
    assert capsys.readouterr().out.startswith("A: The taxi drivers are on strike again.\nB: What for?\n")
    shown = show_replies(tiny_model, tiny_tokenizer, dialogs, count=2, seed=0, max_new_tokens=3)
    assert [record["context"][0] for record in shown] == [
        "The taxi drivers are on strike again.",
        "Is it raining outside?",
    ]
    assert "weed" not in capsys.readouterr().out
    # Fewer dialogues pass than asked for: the first ones that can be cut, so something is still shown.
    assert len(showcase_dialogs(dialogs.select([0, 1]), 2)) == 2


def test_on_dailydialog_the_first_dialogues_shown_are_not_the_drug_deal(shared_data, tmp_path, capsys):
    from gpt2ft.data import prepare_dialogs
    from gpt2ft.notebook import show_example_dialog, showcase_dialogs

    prepared = prepare_dialogs(str(shared_data / "dailydialog"), cache_dir=tmp_path)
    assert "weed" in prepared.dialogs["test"][0]["messages"][0]["content"]  # what the notebook showed first
    samples = showcase_dialogs(prepared.dialogs["test"], 3)
    assert samples[0]["messages"][0]["content"] == "The taxi drivers are on strike again."
    assert all(
        not {"weed", "drugs"} & set(" ".join(m["content"] for m in row["messages"]).lower().split()) for row in samples
    )
    show_example_dialog(prepared.dialogs["train"])
    assert capsys.readouterr().out.count("\n") <= 8


def test_a_reply_is_shown_once_where_nobody_watches_it_grow(tiny_tokenizer, capsys):
    """ReplyStreamer: outside a notebook kernel and a terminal (here, pytest's captured output) the reply is printed
    whole, once, after its label; in a notebook it is one display output updated in place, so a saved notebook (a
    papermill run) holds it once and not one output a token."""
    from gpt2ft.notebook import ReplyStreamer, reply_output

    assert reply_output() == "once"
    ids = tiny_tokenizer("Hello , how are you ? I am fine", add_special_tokens=False)["input_ids"]
    streamer = ReplyStreamer(tiny_tokenizer, label="bot> ")
    streamer.put(torch.tensor([ids[:1]]))  # the prompt, skipped
    for token in ids[1:]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert capsys.readouterr().out == "bot> " + tiny_tokenizer.decode(ids[1:]) + "\n"

    shown = []

    class Handle:
        def update(self, bundle, raw):
            shown[-1] = bundle["text/plain"]

    def display(bundle, raw, display_id):
        shown.append(bundle["text/plain"])
        return Handle()

    import IPython.display

    original, IPython.display.display = IPython.display.display, display
    try:
        live = ReplyStreamer(tiny_tokenizer, label="model: ", output="live")
        for reply in (ids[:4], ids[4:]):
            live.put(torch.tensor([reply[:1]]))
            for token in reply[1:]:
                live.put(torch.tensor([token]))
            live.end()
    finally:
        IPython.display.display = original
    assert shown == ["model: " + tiny_tokenizer.decode(ids[1:4]), "model: " + tiny_tokenizer.decode(ids[5:])]
    assert capsys.readouterr().out == ""


def test_an_evaluation_table_after_training_names_its_split(monkeypatch):
    """In a notebook the Trainer's table of an evaluation outside training says "Validation Loss" whatever the
    split; gpt2ft's callback heads the test split's table "Test Loss"."""
    from types import SimpleNamespace

    import IPython.display

    from gpt2ft.progress import SplitProgressCallback, split_table

    metrics = {
        "test_loss": 2.1,
        "test_perplexity": 8.17,
        "test_tokens": 523,
        "test_bits_per_byte": 1.2,
        "test_runtime": 0.5,
    }
    assert split_table(metrics, 27, 3.0) == [
        ["Step", "Epoch", "Test Loss", "Test Perplexity", "Test Tokens", "Test Bits Per Byte"],
        [27, 3.0, 2.1, 8.17, 523, 1.2],
    ]
    assert split_table({"eval_loss": 2.0}, 9, None) == [["Step", "Validation Loss"], [9, 2.0]]
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda item: shown.append(item.data))
    state = SimpleNamespace(global_step=27, epoch=3.0, log_history=[])
    SplitProgressCallback().on_evaluate(SimpleNamespace(eval_strategy="epoch"), state, None, metrics=metrics)
    (html,) = shown
    assert "<th>Test Loss</th>" in html and "Validation" not in html and "runtime" not in html.lower()


# --------------------------------------------------------------------------------------------------------------
# The whole notebook, top to bottom
# --------------------------------------------------------------------------------------------------------------


def output_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def numbers_in(text: str) -> list[float]:
    return [float(value) for value in re.findall(r"-?\d+\.\d+", text)]


def test_notebook_runs_end_to_end_with_papermill(tiny_model_dir, dailydialog_dir, tmp_path, monkeypatch):
    """The notebook as a user runs it, on CPU with the tiny model and synthetic data, into tmp_path.

    The kernel imports gpt2ft from this checkout (cwd and PYTHONPATH), and inherits conftest's offline settings.
    """
    import papermill

    from gpt2ft.chat_format import template_of
    from gpt2ft.controls import conditioned_template
    from gpt2ft.data import prepare_dialogs
    from gpt2ft.evaluation import evaluate_dialogs
    from gpt2ft.modeling import load_model_and_tokenizer

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    dirs = {name: tmp_path / name for name in ("output", "logs", "images", "cache", "preferred")}
    # The optional preference section too, on a small preference file (the page's votes need a person).
    preferences = tmp_path / "preferences.jsonl"
    preferences.write_text(
        "".join(
            json.dumps({"prompt": question, "chosen": answer, "rejected": "I don't know."}) + "\n"
            for question, answer in EXCHANGES
            for _ in range(3)
        )
    )
    parameters = dict(
        model_name=str(tiny_model_dir),
        data_source=str(dailydialog_dir),
        output_dir=str(dirs["output"]),
        logs_dir=str(dirs["logs"]),
        images_dir=str(dirs["images"]),
        cache_dir=str(dirs["cache"]),
        num_train_epochs=1,
        max_train_dialogs=96,
        max_eval_dialogs=20,
        batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        sample_openings=2,
        compare_samples=4,
        control_contexts=2,
        preference_tuning=True,
        preference_data=str(preferences),
        preferred_dir=str(dirs["preferred"]),
    )
    executed_path = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(executed_path),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
        log_output=False,
    )

    executed = nbformat.read(executed_path, as_version=4)
    cells = code_cells(executed)
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert all(cell.execution_count is not None for cell in cells), "every code cell ran"
    assert (dirs["output"] / "model.safetensors").is_file() and (dirs["output"] / "tokenizer.json").is_file()
    from gpt2ft.checkpoints import checkpoint_dir

    assert not checkpoint_dir(dirs["output"]).exists()
    metrics = json.loads((dirs["logs"] / "metrics.json").read_text())
    prepared = prepare_dialogs(str(dailydialog_dir), cache_dir=dirs["cache"], max_train_dialogs=96, max_eval_dialogs=20)
    assert metrics["train_dialogs"] == prepared.counts["train"]["used"] > 0
    assert metrics["eval_dialogs"] == prepared.counts["validation"]["used"] > 0
    assert (dirs["images"] / "token_lengths.png").is_file() and (dirs["images"] / "chart_train.png").is_file()
    assert ROOT not in dirs["output"].parents  # nothing was written into the checkout's artifact folders

    # Before: the notebook's number is the base model's perplexity, as evaluate_dialogs gives it independently.
    before_text = output_text(next(cell for cell in cells if cell.source.startswith("before = score_splits")))
    match = re.search(r"validation before fine-tuning: loss ([\d.]+), perplexity ([\d.]+)", before_text)
    assert match, before_text
    base_model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    # condition = "auto" on DailyDialog: the run trains with emotion and act controls, and scores the held-out turns
    # with their true labels in front (data.labels_of), so the independent figure renders them the same way.
    assert set(metrics["control"]["fields"]) == {"emotion", "act"}
    tokenizer.chat_template = conditioned_template(template_of(tokenizer), ("emotion", "act"))
    base = evaluate_dialogs(base_model.eval(), tokenizer, prepared.dialogs["validation"], batch_size=32)
    assert float(match.group(1)) == pytest.approx(base["loss"], abs=1e-4)

    # After: the before/after table shows both, and the tiny model learned the synthetic exchanges.
    table_text = output_text(next(cell for cell in cells if cell.source.startswith("before_after_table(")))
    shown = numbers_in(table_text)
    for value in (float(match.group(2)), metrics["eval_perplexity"], metrics["test_perplexity"]):
        assert any(abs(number - value) <= 0.006 for number in shown), (value, table_text)
    assert metrics["eval_perplexity"] < base["perplexity"]

    everything = "\n".join(output_text(cell) for cell in cells)
    assert "you> " in everything and "bot> " in everything and "push_to_hub is False" in everything

    # DailyDialog trains with its labels as controls ("auto"): one context answered in every emotion and act, and
    # the control accuracy measured, charted and recorded.
    controls_text = output_text(next(cell for cell in cells if cell.source.startswith("show_controls(")))
    for label in ("no emotion", "surprise", "inform", "commissive"):
        assert label in controls_text, controls_text
    assert set(metrics["control"]["fields"]) == {"emotion", "act"} and metrics["control"]["contexts"] == 2
    assert (dirs["images"] / "chart_control.png").is_file()

    # Each evaluation table names its split: training's table the validation loss, the one after it the test loss.
    def html_of(source_start: str) -> str:
        cell = next(cell for cell in cells if cell.source.startswith(source_start))
        return "".join(output.get("data", {}).get("text/html", "") for output in cell.outputs)

    assert "<th>Validation Loss</th>" in html_of("fitted = fit(")
    after = html_of("metrics = evaluate_run(")
    assert "<th>Test Loss</th>" in after and "Validation Loss" not in after

    # A reply is kept once in the saved notebook (one output updated while it was written), not one output a token.
    samples = next(cell for cell in cells if cell.source.startswith("samples = show_replies("))
    replies = [output for output in samples.outputs if output.output_type == "display_data"]
    assert len(replies) == parameters["sample_openings"] and len(samples.outputs) <= 3 * len(replies) + 1
    assert all(output.data["text/plain"].startswith("model: ") for output in replies)
    chat = next(cell for cell in cells if "chat_in_notebook(" in cell.source)
    replies = [output for output in chat.outputs if output.output_type == "display_data"]
    assert len(replies) == 3 and len(chat.outputs) <= 2 * len(replies) + 1
    assert all(output.data["text/plain"].startswith("bot> ") for output in replies)

    # Preference tuning started from the notebook's model, wrote its own folders, and showed before and after.
    preferred = json.loads((dirs["logs"] / "prefer" / "metrics.json").read_text())
    assert (
        preferred["started_from"] == str(dirs["output"].resolve())
        and (dirs["preferred"] / "model.safetensors").is_file()
    )
    assert (dirs["images"] / "prefer" / "chart_prefer.png").is_file() and (dirs["logs"] / "metrics.json").is_file()
    table = output_text(next(cell for cell in cells if cell.source.startswith("preference_table(")))
    assert "reward accuracy" in table and "supervised validation perplexity" in table
