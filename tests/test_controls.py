"""gpt2ft.controls: replies in the emotion and act asked for. The labels are inputs in each turn's header, never
targets; the saved template takes them as arguments; a tiny model trained on a task whose wording depends on the
label answers in the label asked for, and `eval --control` and the run's metrics say so.

    python -m pytest tests/test_controls.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import pytest
from conftest import EXCHANGES, build_tiny_model_dir, train_argv, write_records

from gpt2ft.chat_format import find_spans, render_text, split_into_turns, template_of
from gpt2ft.cli import main
from gpt2ft.controls import (
    LABEL_DROPOUT,
    asked,
    condition_fields,
    conditioned_template,
    controls_of,
    dropped,
    labelled_messages,
    plain_template,
)
from gpt2ft.conversations import LABELS
from gpt2ft.data import IGNORE_INDEX, dialogs_dataset, tokenize_dialogs
from gpt2ft.errors import ConfigError

# The reply's wording says its emotion: a tiny model can learn it only by reading the label it is given.
REPLIES = {
    "no emotion": "Okay .",
    "anger": "That makes me so angry !",
    "disgust": "Yuck , how gross .",
    "fear": "I am scared of that .",
    "happiness": "Great , I love it !",
    "sadness": "Oh no , that is sad .",
    "surprise": "Wow , really ?",
}
QUESTIONS = [question for question, _ in EXCHANGES]


def labelled_conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        emotion = rng.choice(list(REPLIES))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": rng.choice(QUESTIONS), "emotion": "no emotion", "act": "question"},
                    {"role": "assistant", "content": REPLIES[emotion], "emotion": emotion, "act": "inform"},
                ]
            }
        )
    return records


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The labelled task as a folder of train/validation/test JSONL files, and a tiny GPT-2 whose tokenizer knows
    its words."""
    root = tmp_path_factory.mktemp("controls")
    data = root / "data"
    for split, n, seed in (("train", 420, 0), ("validation", 40, 1), ("test", 40, 2)):
        write_records(data / f"{split}.jsonl", labelled_conversations(n, seed))
    corpus = tuple(REPLIES.values()) + tuple(f"[emotion: {label}]" for label in LABELS["emotion"])
    model = build_tiny_model_dir(root / "model", n_embd=64, extra_corpus=corpus)
    return {"root": root, "data": data, "model": model}


@pytest.fixture(scope="module")
def conditioned(task):
    dirs = {name: str(task["root"] / "run" / name) for name in ("output", "logs", "images", "cache")}
    # --keep-overlap: the task has 56 distinct conversations, which held-out splits drawn from it repeat.
    flags = (
        "--condition",
        "emotion",
        "--epochs",
        "8",
        "--learning-rate",
        "3e-3",
        "--control-contexts",
        "10",
        "--keep-overlap",
    )
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(train_argv(task["model"], task["data"], dirs, *flags))
    assert code == 0, stderr.getvalue()
    return {"dirs": dirs, "metrics": json.loads(stdout.getvalue().strip().splitlines()[-1])}


def test_the_template_renders_labels_as_inputs_with_no_loss_on_them(tiny_tokenizer):
    tiny_tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tiny_tokenizer.chat_template = conditioned_template(template_of(tiny_tokenizer), ("emotion", "act"))
    messages = [
        {"role": "user", "content": "Hi, how are you?", "emotion": "no emotion", "act": "question"},
        {"role": "assistant", "content": "I am fine.", "emotion": "happiness", "act": "inform"},
    ]
    text = render_text(tiny_tokenizer, messages)
    assert "[emotion: happiness; act: inform]\nI am fine." in text
    spans = find_spans(text, messages, tiny_tokenizer.eos_token)
    encoded = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    turns = split_into_turns(text, spans, encoded["input_ids"], encoded["offset_mapping"]).turns
    trained = [tiny_tokenizer.decode([i for i, keep in zip(turn.ids, turn.trainable) if keep]) for turn in turns]
    assert trained == ["Hi, how are you?<|endoftext|>", "I am fine.<|endoftext|>"]  # the tags are never targets
    rows = tokenize_dialogs(dialogs_dataset([messages]), tiny_tokenizer, 256, loss_on="all")
    labels = [token for token in rows[0]["labels"] if token != IGNORE_INDEX]
    assert "emotion" not in tiny_tokenizer.decode(labels) and "I am fine." in tiny_tokenizer.decode(labels)


def test_the_saved_template_asks_for_a_label_through_plain_transformers(conditioned):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(conditioned["dirs"]["output"])
    assert controls_of(tokenizer.chat_template) == ("emotion",)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Do you like tea ?"}],
        tokenize=False,
        add_generation_prompt=True,
        emotion="sadness",
    )
    assert prompt.endswith("Do you like tea ?<|endoftext|>[emotion: sadness]\n")
    plain = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert plain == "<|endoftext|>Hi<|endoftext|>"  # nothing asked for: no tag


def test_asking_for_a_label_moves_the_reply_to_it(conditioned):
    from gpt2ft.generate import generate_reply, load_for_generation

    model, tokenizer = load_for_generation(conditioned["dirs"]["output"])
    matched = 0
    for emotion, reply in REPLIES.items():
        text = generate_reply(model, tokenizer, ["Do you like tea ?"], greedy=True, controls={"emotion": emotion}).text
        matched += text == reply
    assert matched >= 5, matched  # of 7: the label, not the question, decides the wording


def test_the_run_measures_its_controls_with_its_own_judge(conditioned):
    metrics, output = conditioned["metrics"], Path(conditioned["dirs"]["output"])
    control = metrics["control"]["fields"]["emotion"]
    assert control["random"] == pytest.approx(1 / 7)
    assert control["macro_accuracy"] > 0.7 and control["macro_accuracy"] > control["macro_chance"] + 0.3
    assert set(control["accuracy"]) == set(LABELS["emotion"])  # every label asked for equally often
    assert control["replies"] == 7 * metrics["control"]["contexts"] and control["eos_rate"] > 0.8
    assert metrics["control"]["judge"]["emotion"]["macro_f1"] > 0.8  # the judge's own score, on the test turns
    assert (output / "judge" / "judge.json").is_file() and (output / "judge" / "judge.safetensors").is_file()
    saved = json.loads(Path(conditioned["dirs"]["logs"], "metrics.json").read_text())
    assert saved["control"]["fields"]["emotion"]["macro_accuracy"] == control["macro_accuracy"]
    # Asked for nothing, the model has still learned the replies (here the label alone decides the wording, so the
    # true labels must help; on DailyDialog the two are within 2%: bench/RESULTS.md).
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_unlabelled"] < metrics["base_eval_perplexity"] / 10
    assert "Control" in (output / "README.md").read_text()
    assert (Path(conditioned["dirs"]["images"]) / "chart_control.png").stat().st_size > 1000


def test_eval_control_judges_the_saved_model(conditioned, task, capsys):
    dirs = conditioned["dirs"]
    code = main(["eval", "--model", dirs["output"], "--split", "test", "--cache-dir", dirs["cache"], "--control", "5"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["contexts"] == 5 and report["fields"]["emotion"]["replies"] == 35
    assert report["perplexity_labelled"] > 0 and report["perplexity_unlabelled"] > 0
    assert report["judge"]["emotion"]["turns"] > 0


def test_unknown_labels_are_refused_in_one_line(task, tmp_path, capsys, conditioned):
    bad = labelled_conversations(5, 3)
    bad[3]["messages"][1]["emotion"] = "joy"
    data = tmp_path / "bad"
    for split in ("train", "validation", "test"):
        write_records(data / f"{split}.jsonl", bad)
    dirs = {name: str(tmp_path / name) for name in ("output", "logs", "images", "cache")}
    assert main(train_argv(task["model"], data, dirs, "--condition", "emotion")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'joy'" in err[0] and "train.jsonl:4" in err[0]
    assert main(["chat", "--model", conditioned["dirs"]["output"], "--emotion", "joy"]) == 2
    assert "--emotion joy: not a DailyDialog emotion" in capsys.readouterr().err


def test_a_model_without_controls_says_so(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--emotion", "happiness", "Hi!"]) == 2
    assert "was not trained with emotion controls" in capsys.readouterr().err


def test_conditioning_needs_labelled_data(tiny_model_dir, tmp_path, capsys):
    from conftest import make_conversations, write_conversations

    data = write_conversations(tmp_path / "chats.jsonl", make_conversations(60, 0))
    dirs = {name: str(tmp_path / name) for name in ("output", "logs", "images", "cache")}
    assert main(train_argv(tiny_model_dir, data, dirs, "--condition", "act")) == 2
    assert "carry no 'act' labels" in capsys.readouterr().err


def test_dropout_is_a_fixed_share_of_turns_and_held_out_rows_keep_every_label():
    picks = [dropped(f"dialogue-{i}", turn) for i in range(400) for turn in range(5)]
    assert picks == [dropped(f"dialogue-{i}", turn) for i in range(400) for turn in range(5)]  # the same every run
    assert abs(sum(picks) / len(picks) - LABEL_DROPOUT) < 0.03
    messages = [{"role": "user", "content": "Hi", "emotion": "happiness", "act": "question"}]
    assert labelled_messages(messages, ("act",)) == [{"role": "user", "content": "Hi", "act": "question"}]


def test_conditions_and_requests_are_checked():
    assert condition_fields("emotion,act") == ("emotion", "act") and condition_fields("none") == ()
    with pytest.raises(ConfigError, match="--condition mood"):
        condition_fields("mood")
    assert asked("happiness", "any") == {"emotion": "happiness"}
    with pytest.raises(ConfigError, match="--act chat"):
        asked(None, "chat")
    wrapped = conditioned_template("{{ messages[0]['content'] }}", ("emotion",))
    assert plain_template(wrapped) == "{{ messages[0]['content'] }}"
    assert conditioned_template(wrapped, ("act",)).count("gpt2ft controls:") == 1  # wrapping twice changes nothing


def test_the_readme_asks_for_a_label_through_plain_transformers_as_written(conditioned, tmp_path, monkeypatch, capsys):
    import shutil

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Controls") : readme.index("\n## ", readme.index("## Controls") + 1)]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copytree(conditioned["dirs"]["output"], tmp_path / "gpt2_finetuned")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # as written: this model reads emotion, the act is left unread
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(printed) == 2  # a reply from each route


def test_compare_asks_each_model_only_for_the_labels_it_reads(tiny_model_dir, dailydialog_dir, tmp_path, capsys):
    """`compare --emotion`: a plain base model beside a conditioned one is asked for nothing (not refused), the
    conditioned one for the label; the table says which got what. No model reading the label is one line."""
    import shutil

    from gpt2ft.modeling import load_tokenizer

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    tokenizer = load_tokenizer(str(tuned))
    tokenizer.chat_template = conditioned_template(template_of(tokenizer), ("emotion", "act"))
    tokenizer.save_pretrained(tuned)
    argv = ["compare", "--data", str(dailydialog_dir), "--max-dialogs", "4", "--samples", "2", "--max-new-tokens", "4"]
    argv += ["--greedy", "--emotion", "happiness", "--base", str(tiny_model_dir)]
    assert main([*argv, "--tuned", str(tuned)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    assert out[1].startswith("decoding (every model): ") and out[1].endswith("; asked for emotion=happiness")
    table = out[2:]
    assert table[0].startswith("| model | controls | perplexity")
    assert table[2].startswith("| base | none |") and table[3].startswith("| fine-tuned | emotion: happiness |")
    assert main([*argv, "--tuned", str(tiny_model_dir)]) == 2
    assert "--emotion happiness: none of" in capsys.readouterr().err
