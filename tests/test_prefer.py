"""gpt2ft.prefer: preference tuning (DPO, KTO) end to end on a tiny GPT-2, offline, on CPU.

    pytest tests/test_prefer.py -s          # -s also prints the before/after figures of the style task

The task (made here, small enough for a 2-layer, 64-wide GPT-2): a user asks one or two of conftest's eight
EXCHANGES questions and the assistant answers each, starting either "Of course." (polite) or "Ugh." (rude).
Supervised fine-tuning (`python -m gpt2ft train`) sees both styles equally often, so the tuned model opens about half
of its replies each way and answers correctly. People then vote on the blind A/B page (the votes are written with
gpt2ft's own votes code) for the polite reply, on conversations about the first six questions only. `prefer` should
move the model's sampled replies to the two *unseen* questions toward "Of course." while they still carry the right
answer (what supervised tuning taught).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import (
    EXCHANGES,
    Crash,
    CrashAt,
    PoisonWeights,
    assert_same_weights,
    build_tiny_model_dir,
    crash_during_final_save,
    read_jsonl,
)
from safetensors.torch import load_file
from transformers import TrainerCallback

from gpt2ft.checkpoints import checkpoint_dir, complete_checkpoints
from gpt2ft.cli import build_parser, config_from_args, main
from gpt2ft.config import PreferConfig, TrainConfig
from gpt2ft.data import clean_turn
from gpt2ft.errors import TrainingError

QA = [(clean_turn(question), clean_turn(answer)) for question, answer in EXCHANGES]
SEEN, UNSEEN = QA[:6], QA[6:]  # votes are cast on the first six questions only
POLITE, RUDE = "Of course.", "Ugh."
SFT_CONVERSATIONS, SFT_EPOCHS = 320, 8
# DPO on a 64-wide model from 160 votes: a learning rate far above GPT-2 small's default moves it in three epochs.
PREFER_FLAGS = (
    "--learning-rate",
    "1e-4",
    "--beta",
    "0.1",
    "--epochs",
    "3",
    "--logging-steps",
    "5",
    "--system-interval-s",
    "0.2",
)


# --------------------------------------------------------------------------------------------------------------
# The task: a fine-tuned model, and votes on its replies
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: a 64-wide model gains nothing from more, and on a busy 2-core machine a
    second thread spins waiting for the other (measured: the fine-tuning fixture took 64 s with two, 7.5 s with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_cli(argv: list[str]) -> tuple[int, dict | None, str]:
    """Run `python -m gpt2ft ...` in-process: exit code, its JSON line (if any) and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, err.getvalue()


@pytest.fixture(scope="module")
def style_task(tmp_path_factory) -> dict[str, Path]:
    """The supervised model of the style task: a tiny GPT-2 whose tokenizer knows the replies, fine-tuned by
    `python -m gpt2ft train` for 8 epochs on 320 conversations of one or two exchanges, each reply polite or rude at
    random (so the held-out dialogues mix both styles too)."""
    root = tmp_path_factory.mktemp("style_task")
    base = build_tiny_model_dir(
        root / "base", n_embd=64, extra_corpus=tuple(f"{s} {a}" for _, a in QA for s in (POLITE, RUDE))
    )
    rng = random.Random(0)
    conversations = []
    for _ in range(SFT_CONVERSATIONS):
        messages = []
        for _ in range(rng.randint(1, 2)):
            question, answer = rng.choice(QA)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{rng.choice((POLITE, RUDE))} {answer}"},
            ]
        conversations.append({"messages": messages})
    sft_data = root / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    # --keep-overlap: repeated conversations are part of the task (they set how often each style appears).
    code, _, err = run_cli(
        [
            "train",
            "--model",
            str(base),
            "--data",
            str(sft_data),
            "--output-dir",
            str(root / "sft"),
            "--logs-dir",
            str(root / "sft_logs"),
            "--images-dir",
            str(root / "sft_images"),
            "--cache-dir",
            str(root / "cache"),
            "--batch-size",
            "16",
            "--epochs",
            str(SFT_EPOCHS),
            "--learning-rate",
            "3e-3",
            "--logging-steps",
            "50",
            "--keep-overlap",
        ]
    )
    assert code == 0, err
    return {"root": root, "model": root / "sft", "sft_data": sft_data, "cache": root / "cache"}


def write_style_votes(path: Path, count: int = 160, seed: int = 1) -> dict[str, int]:
    """Votes as the blind page stores them (votes.record_vote): the polite and the rude reply to one of the first six
    questions in a random order, the polite one winning, with 10% ties and 10% "both bad" (two rude replies).

    Returns:
        Votes per verdict.
    """
    from gpt2ft.votes import init_votes_db, record_vote

    init_votes_db(path)
    rng = random.Random(seed)
    verdicts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    settings = {"model": "gpt2_finetuned", "temperature": 0.8, "top_p": 0.9}
    for _ in range(count):
        question, answer = rng.choice(SEEN)
        conversation = [{"role": "user", "content": question}]
        polite, rude = f"{POLITE} {answer}", f"{RUDE} {answer}"
        draw = rng.random()
        if draw < 0.1:
            a, b, winner = polite, rude, "tie"
        elif draw < 0.2:
            a, b, winner = rude, rude, "both_bad"
        elif rng.random() < 0.5:
            a, b, winner = polite, rude, "a"
        else:
            a, b, winner = rude, polite, "b"
        record_vote(path, conversation, a, b, "gpt2_finetuned", "gpt2", winner, settings)
        verdicts[winner] += 1
    return verdicts


@pytest.fixture(scope="module")
def votes(style_task) -> tuple[Path, dict[str, int]]:
    path = style_task["root"] / "votes.sqlite"
    return path, write_style_votes(path)


def prefer_argv(model, data, root: Path, *extra: str) -> list[str]:
    return [
        "prefer",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(root / "preferred"),
        "--logs-dir",
        str(root / "logs"),
        "--images-dir",
        str(root / "images"),
        "--cache-dir",
        str(root / "cache"),
        *extra,
    ]


def style_rates(folder: Path, questions, samples: int = 20, seed: int = 0) -> dict[str, float]:
    """Sampled replies (the saved decoding defaults: temperature 0.8, top-p 0.9) to each question: the share that
    open politely, and the share that carry the question's answer."""
    from gpt2ft.generate import generate_reply, load_for_generation

    model, tokenizer = load_for_generation(str(folder))
    torch.manual_seed(seed)
    polite = correct = total = 0
    for question, answer in questions:
        for _ in range(samples):
            reply = generate_reply(model, tokenizer, [{"role": "user", "content": question}]).text
            total += 1
            polite += reply.startswith(POLITE)
            correct += answer in reply
    return {"polite": polite / total, "correct": correct / total}


@pytest.fixture(scope="module")
def dpo_run(style_task, votes):
    """`python -m gpt2ft prefer` on the votes database (DPO, full), into its own folders."""
    root = style_task["root"] / "dpo"
    code, metrics, err = run_cli(prefer_argv(style_task["model"], votes[0], root, *PREFER_FLAGS))
    assert code == 0, err
    return {
        "root": root,
        "output": root / "preferred",
        "logs": root / "logs",
        "images": root / "images",
        "metrics": metrics,
        "stderr": err,
    }


# --------------------------------------------------------------------------------------------------------------
# The task, learned
# --------------------------------------------------------------------------------------------------------------


def test_dpo_on_the_votes_moves_replies_to_unseen_prompts_toward_the_preferred_side(style_task, dpo_run):
    before = style_rates(style_task["model"], UNSEEN)
    after = style_rates(dpo_run["output"], UNSEEN)
    metrics = dpo_run["metrics"]
    print(
        f"\nstyle task, unseen prompts: polite {before['polite']:.3f} -> {after['polite']:.3f}, correct answer "
        f"{before['correct']:.3f} -> {after['correct']:.3f}; held-out reward accuracy "
        f"{metrics['reward_accuracy_before']:.3f} -> {metrics['reward_accuracy_after']:.3f}, "
        f"margin {metrics['reward_margin_before']:.3f} -> {metrics['reward_margin_after']:.3f}, "
        f"logp accuracy {metrics['logp_accuracy_before']:.3f} -> {metrics['logp_accuracy_after']:.3f}, "
        f"supervised perplexity {metrics['sft_perplexity_before']:.3f} -> {metrics['sft_perplexity_after']:.3f}"
    )
    assert 0.25 <= before["polite"] <= 0.75  # supervised tuning taught both styles
    assert (
        after["polite"] >= 0.9 and after["polite"] - before["polite"] >= 0.25
    )  # the votes' side, on prompts never voted on
    assert before["correct"] >= 0.9 and after["correct"] >= 0.9  # and still the right answer
    # Half the held-out dialogues open rudely, which the model now avoids: their perplexity rises, but only a little.
    assert metrics["sft_perplexity_before"] < metrics["sft_perplexity_after"] < 1.5 * metrics["sft_perplexity_before"]
    assert metrics["reward_accuracy_before"] == 0.0 and metrics["reward_margin_before"] == 0.0  # its own reference
    assert metrics["reward_accuracy_after"] >= 0.9 and metrics["reward_margin_after"] > 0
    # Whatever the supervised model happened to prefer before, afterwards it finds the preferred reply likelier.
    assert metrics["logp_accuracy_after"] >= max(metrics["logp_accuracy_before"], 0.9)


def test_the_votes_used_and_skipped_are_counted_and_printed(votes, dpo_run):
    _, verdicts = votes
    metrics = dpo_run["metrics"]
    counts = metrics["data_counts"]
    assert counts["winners"] == {"votes": sum(verdicts.values()), **verdicts}
    assert counts["train"]["used"] + counts["validation"]["used"] == verdicts["a"] + verdicts["b"]
    assert metrics["train_pairs"] == counts["train"]["used"] and metrics["eval_pairs"] == counts["validation"]["used"]
    assert sorted(counts["skipped"].values()) == sorted([verdicts["tie"], verdicts["both_bad"]])
    err = dpo_run["stderr"]
    assert f"{sum(verdicts.values())} votes ({verdicts['a']} A better, {verdicts['b']} B better" in err
    assert f"{verdicts['tie']} tie votes" in err and f"{verdicts['both_bad']} both-bad votes" in err


def test_the_run_writes_what_train_writes(style_task, dpo_run):
    output, logs, metrics = dpo_run["output"], dpo_run["logs"], dpo_run["metrics"]
    assert json.loads((logs / "metrics.json").read_text()) == metrics
    assert (output / "model.safetensors").is_file() and not list(output.glob("*.bin"))
    assert not checkpoint_dir(output).exists()  # deleted once the model is saved
    for chart in ("chart_train.png", "chart_prefer.png", "chart_memory.png"):
        assert (dpo_run["images"] / chart).stat().st_size > 1000
    assert (output / "chart_prefer.png").is_file() and (output / "chart_train.png").is_file()
    # Whole-run numbers, as train's: one log record per step, train_loss their mean, tokens = the replies' tokens.
    records = read_jsonl(logs / "train_log.jsonl")
    steps = [record["step"] for record in records if "loss" in record]
    assert steps == sorted(set(steps)) and metrics["steps"] - 5 < steps[-1] <= metrics["steps"]  # --logging-steps 5
    assert metrics["train_tokens"] > 0 and records[-1]["tokens_seen"] == metrics["train_tokens"]
    assert any("eval_rewards/accuracies" in record for record in records)
    # The folder says which stage made it, from which model and which data, and keeps the model's own settings.
    saved = json.loads((output / "training_config.json").read_text())
    assert saved["stage"] == "prefer" and saved["algorithm"] == "dpo"
    assert saved["started_from"] == str(style_task["model"].resolve())
    assert saved["preference_data"].endswith("votes.sqlite") and saved["prefer_config"]["beta"] == 0.1
    assert saved["config"]["data"] == str(style_task["sft_data"])  # the supervised data, for eval/compare/next round
    card = (output / "README.md").read_text()
    assert "preference-tuned with DPO" in card and str(style_task["model"].resolve()) in card and "votes.sqlite" in card
    assert f"{metrics['reward_accuracy_after']:.3f}" in card and "supervised validation perplexity" in card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template and AutoModelForCausalLM.from_pretrained(output).config.use_cache is True


def test_the_reported_numbers_are_recomputed_with_plain_transformers(style_task, votes, dpo_run):
    """Reward accuracy and margin from each held-out pair's log-probabilities under the saved model and the starting
    model, computed one sequence at a time with model(labels=...); perplexity with `eval`'s own evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2ft.data import prepare_dialogs
    from gpt2ft.evaluation import evaluate_dialogs
    from gpt2ft.preferences import read_preferences

    held_out = read_preferences(str(votes[0]), cache_dir=None).records["validation"]
    tokenizer = AutoTokenizer.from_pretrained(style_task["model"])

    def logp(model, prompt, reply) -> float:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
        assert full[: len(prompt_ids)] == prompt_ids and full[-1] == tokenizer.eos_token_id  # the reply ends with EOS
        labels = torch.tensor([[-100] * len(prompt_ids) + full[len(prompt_ids) :]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([full]), labels=labels).loss
        return -float(loss) * (len(full) - len(prompt_ids))

    start = AutoModelForCausalLM.from_pretrained(style_task["model"]).eval()
    tuned = AutoModelForCausalLM.from_pretrained(dpo_run["output"]).eval()
    beta, margins = 0.1, []
    for pair in held_out:
        chosen = beta * (logp(tuned, pair["prompt"], pair["chosen"]) - logp(start, pair["prompt"], pair["chosen"]))
        rejected = beta * (
            logp(tuned, pair["prompt"], pair["rejected"]) - logp(start, pair["prompt"], pair["rejected"])
        )
        margins.append(chosen - rejected)
    metrics = dpo_run["metrics"]
    assert metrics["eval_pairs"] == len(held_out)
    assert metrics["reward_accuracy_after"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["reward_margin_after"] == pytest.approx(sum(margins) / len(margins), rel=1e-4)

    prepared = prepare_dialogs(str(style_task["sft_data"]), cache_dir=style_task["cache"], keep_overlap=True)
    from gpt2ft.modeling import load_model_and_tokenizer

    for key, folder in (("sft_perplexity_before", style_task["model"]), ("sft_perplexity_after", dpo_run["output"])):
        model, tok = load_model_and_tokenizer(str(folder))
        scored = evaluate_dialogs(model.eval(), tok, prepared.dialogs["validation"], loss_on=prepared.loss_on)
        assert metrics[key] == pytest.approx(scored["perplexity"], rel=1e-5), key


def test_serve_compares_the_preferred_model_with_the_model_it_started_from(style_task, dpo_run):
    from gpt2ft.serve import ServedModel, default_opponent, describe_model, format_model_line

    output = str(dpo_run["output"])
    assert default_opponent(output) == str(style_task["model"].resolve())
    info = describe_model(output)
    assert info["stage"] == "prefer" and info["eval_perplexity"] == pytest.approx(
        dpo_run["metrics"]["sft_perplexity_after"]
    )
    line = format_model_line(ServedModel(output, None, None, "preferred", info))
    assert "preference-tuned (DPO) from `sft`" in line
    assert default_opponent(str(style_task["model"])) == str(
        style_task["root"] / "base"
    )  # fine-tuned: its base, as before


def test_eval_and_a_second_round_find_the_supervised_data(style_task, dpo_run, tmp_path):
    """The preferred folder carries the starting model's settings: `eval` scores it on the same supervised data,
    and `prefer` from it (the next round of votes) measures that data too."""
    code, scored, err = run_cli(["eval", "--model", str(dpo_run["output"]), "--cache-dir", str(style_task["cache"])])
    assert code == 0, err
    assert scored["perplexity"] == pytest.approx(dpo_run["metrics"]["sft_perplexity_after"], rel=1e-5)
    second = tmp_path / "votes.sqlite"
    write_style_votes(second, count=40, seed=7)
    code, metrics, err = run_cli(
        prefer_argv(dpo_run["output"], second, tmp_path, "--max-steps", "2", "--logging-steps", "1")
    )
    assert code == 0, err
    assert metrics["sft_perplexity_before"] == pytest.approx(dpo_run["metrics"]["sft_perplexity_after"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# KTO, LoRA
# --------------------------------------------------------------------------------------------------------------


def test_kto_learns_from_the_votes_both_bad_ones_included(style_task, votes, tmp_path):
    _, verdicts = votes
    code, metrics, err = run_cli(
        prefer_argv(style_task["model"], votes[0], tmp_path, "--algorithm", "kto", *PREFER_FLAGS[:4], "--epochs", "1")
    )
    assert code == 0, err
    counts = metrics["data_counts"]
    assert (
        counts["train"]["used"] + counts["validation"]["used"]
        == 2 * (verdicts["a"] + verdicts["b"]) + 2 * verdicts["both_bad"]
    )
    assert list(counts["skipped"].values()) == [verdicts["tie"]]
    undesirable, desirable = verdicts["a"] + verdicts["b"] + 2 * verdicts["both_bad"], verdicts["a"] + verdicts["b"]
    # More undesirable replies than desirable: the desirable side is weighted up so both weigh alike.
    assert metrics["kto_weights"] == {"desirable": pytest.approx(undesirable / desirable, rel=0.2), "undesirable": 1.0}
    assert (
        metrics["reward_accuracy_before"] == 0.0
        and metrics["reward_accuracy_after"] > 0.5
        and metrics["reward_margin_after"] > 0
    )
    assert "KTO" in (tmp_path / "preferred" / "README.md").read_text()


def test_lora_uses_the_model_with_adapters_off_as_the_reference(style_task, votes, tmp_path):
    from gpt2ft.config import build_config
    from gpt2ft.modeling import load_model
    from gpt2ft.prefer import (
        build_preference_trainer,
        completion_logps,
        load_policy,
        plan_preference,
        preference_rows,
        prepare_preferences,
        reference_logps,
        run_settings,
    )

    dirs = {
        "output_dir": str(tmp_path / "stages"),
        "logs_dir": str(tmp_path / "stage_logs"),
        "images_dir": str(tmp_path / "stage_images"),
    }
    config = build_config(
        config_class=PreferConfig,
        model=str(style_task["model"]),
        data=str(votes[0]),
        method="lora",
        cache_dir=str(tmp_path / "cache"),
        **dirs,
    )
    plan = plan_preference(config)
    data = prepare_preferences(plan)
    loaded = load_policy(plan)
    rows = preference_rows(plan, data, loaded.tokenizer)
    trainer = build_preference_trainer(plan, loaded, rows, data, run_settings(plan, data, rows))
    assert trainer.ref_model is None  # no second copy of the model
    rows = trainer.eval_dataset
    prompts, replies = rows["prompt_ids"][:], rows["chosen_ids"][:]
    with torch.no_grad():
        for module in trainer.model.modules():  # move the adapters off zero, so "adapters off" differs from "on"
            if hasattr(module, "lora_B"):
                for weight in module.lora_B.values():
                    weight.weight.fill_(0.01)
    start = completion_logps(load_model(str(style_task["model"])), prompts, replies, batch_size=8)
    assert reference_logps(trainer, prompts, replies, 8, "fp32") == pytest.approx(start, abs=1e-4)
    assert completion_logps(trainer.model, prompts, replies, batch_size=8) != pytest.approx(start, abs=1e-3)

    code, metrics, err = run_cli(
        prefer_argv(
            style_task["model"], votes[0], tmp_path, "--method", "lora", "--learning-rate", "1e-3", "--epochs", "2"
        )
    )
    assert code == 0, err
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] and metrics["method"] == "lora"
    assert metrics["reward_accuracy_after"] >= 0.9 and metrics["reward_margin_after"] > 0
    output = tmp_path / "preferred"
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(output)).__name__ == "GPT2LMHeadModel"  # merged: no PEFT needed


# --------------------------------------------------------------------------------------------------------------
# Resume, NaN and out of memory
# --------------------------------------------------------------------------------------------------------------


def prefer_config(style_task, data, root: Path, **changes) -> PreferConfig:
    args = build_parser().parse_args(
        prefer_argv(
            style_task["model"], data, root, *PREFER_FLAGS[:4], "--logging-steps", "1", "--system-interval-s", "0.2"
        )
    )
    config, _ = config_from_args(args, PreferConfig)
    return config.replace(**changes)


def test_resume_after_a_crash_matches_an_uninterrupted_run(style_task, votes, tmp_path):
    from gpt2ft.prefer import prefer

    settings = dict(max_steps=8, eval_steps=4, keep_checkpoints=True)
    reference = prefer(prefer_config(style_task, votes[0], tmp_path / "straight", **settings))
    config = prefer_config(style_task, votes[0], tmp_path / "resumed", **settings)
    with pytest.raises(Crash):
        prefer(config, callbacks=[CrashAt(at=6)])
    assert [p.name for p in complete_checkpoints(checkpoint_dir(config.output_dir))] == ["checkpoint-4"]
    assert not Path(config.output_dir, "model.safetensors").exists()

    changed = config.replace(beta=0.2)  # another run's settings: refused, with the way out
    code = main(
        prefer_argv(
            style_task["model"],
            votes[0],
            tmp_path / "resumed",
            *PREFER_FLAGS[:2],
            "--beta",
            "0.2",
            "--max-steps",
            "8",
            "--eval-steps",
            "4",
        )
    )
    assert code == 2 and changed.beta == 0.2

    resumed = prefer(config)
    assert resumed.resumed_from.endswith("checkpoint-4") and resumed.metrics["steps"] == 8
    for key in ("train_tokens", "steps", "train_pairs", "eval_pairs"):
        assert resumed.metrics[key] == reference.metrics[key], key
    for key in ("train_loss", "reward_margin_after", "sft_perplexity_after"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-3), key
    steps = [record["step"] for record in read_jsonl(Path(config.logs_dir, "train_log.jsonl")) if "loss" in record]
    assert steps == list(range(1, 9))  # each step once: no gap, no repeat


def test_a_kill_while_saving_the_model_mid_epoch_resumes_to_the_uninterrupted_run(
    style_task, votes, tmp_path, monkeypatch
):
    """Killed while writing the preferred model, its last checkpoint the last step's and mid-epoch: the same command
    takes no further step, and ends with the uninterrupted run's steps, tokens and weights."""
    from gpt2ft.prefer import prefer

    settings = dict(max_steps=5, eval_steps=4, keep_checkpoints=True)
    reference = prefer(prefer_config(style_task, votes[0], tmp_path / "straight", **settings))
    assert reference.metrics["steps"] == 5 and reference.metrics["epochs"] % 1 != 0  # stopped mid-epoch
    config = prefer_config(style_task, votes[0], tmp_path / "killed", **settings)
    with monkeypatch.context() as patch:
        crash_during_final_save(patch)
        with pytest.raises(Crash):
            prefer(config)
    assert complete_checkpoints(checkpoint_dir(config.output_dir))[-1].name == "checkpoint-5"
    resumed = prefer(config)
    assert resumed.resumed_from.endswith("checkpoint-5")
    for key in ("steps", "train_tokens", "epochs", "train_loss"):
        assert resumed.metrics[key] == reference.metrics[key], key
    assert_same_weights(config.output_dir, reference.output_dir)


def test_a_changed_setting_refuses_the_checkpoint_in_one_line(style_task, votes, tmp_path, capsys):
    from gpt2ft.prefer import prefer

    with pytest.raises(Crash):
        prefer(prefer_config(style_task, votes[0], tmp_path, max_steps=6, eval_steps=2), callbacks=[CrashAt(at=3)])
    code = main(
        prefer_argv(
            style_task["model"],
            votes[0],
            tmp_path,
            *PREFER_FLAGS[:2],
            "--beta",
            "0.3",
            "--max-steps",
            "6",
            "--eval-steps",
            "2",
            "--logging-steps",
            "1",
        )
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "beta 0.1 -> 0.3" in lines[0] and "--beta 0.1" in lines[0] and "--resume never" in lines[0]


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(style_task, votes, tmp_path):
    from gpt2ft.prefer import prefer

    config = prefer_config(style_task, votes[0], tmp_path, max_steps=10, eval_steps=2)
    with pytest.raises(TrainingError) as raised:
        prefer(config, callbacks=[PoisonWeights(at=3)])
    message = str(raised.value)
    assert "step 4" in message and "NaN" in message and "--beta" in message
    assert complete_checkpoints(checkpoint_dir(config.output_dir))[-1].name == "checkpoint-2"
    assert not Path(config.output_dir, "model.safetensors").exists()


class OutOfMemoryAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_settings_that_keep_the_effective_batch(style_task, votes, tmp_path):
    from gpt2ft.prefer import prefer

    with pytest.raises(TrainingError) as raised:
        prefer(prefer_config(style_task, votes[0], tmp_path), callbacks=[OutOfMemoryAt()])
    assert "--batch-size 4 --gradient-accumulation-steps 2" in str(raised.value)


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


def test_prefer_flags_are_prefer_config_and_its_defaults_are_for_a_t4():
    config, typed = config_from_args(build_parser().parse_args(["prefer"]), PreferConfig)
    assert config == PreferConfig() and typed == set()
    assert (config.model, config.data, config.output_dir) == ("gpt2_finetuned", "logs/votes.sqlite", "gpt2_preferred")
    assert (
        config.logs_dir != TrainConfig().logs_dir and config.images_dir != TrainConfig().images_dir
    )  # train's files stay
    config, typed = config_from_args(
        build_parser().parse_args(["prefer", "--algorithm", "kto", "--beta", "0.3", "--method", "lora"]), PreferConfig
    )
    assert (config.algorithm, config.beta, config.method) == ("kto", 0.3, "lora") and typed == {
        "algorithm",
        "beta",
        "method",
    }


def test_trl_defaults_that_would_hurt_are_overridden():
    """TRL's configs turn bf16 on whenever fp16 is off (a T4 has no bf16 units) and gradient checkpointing on:
    gpt2ft's precision rule and flag decide instead."""
    from gpt2ft.modeling import Hardware
    from gpt2ft.prefer import build_preference_args

    cpu = Hardware("cpu", "CPU", None, None)
    for algorithm in ("dpo", "kto"):
        args = build_preference_args(PreferConfig(algorithm=algorithm), "fp32", cpu, "/tmp/unused", 256)
        assert (args.bf16, args.fp16, args.activation_checkpointing) == (False, False, False)
        assert (args.learning_rate, args.beta, args.max_length) == (PreferConfig().learning_rate, 0.1, 256)
    assert (
        build_preference_args(PreferConfig(algorithm="kto"), "fp32", cpu, "/tmp/unused", 256).train_sampling_strategy
        == "sequential"
    )


def test_t4_presets_fit_large_models_but_keep_the_preference_learning_rate():
    from gpt2ft.modeling import Hardware, choose_precision
    from gpt2ft.scale import choose_presets

    t4 = Hardware("cuda", "Tesla T4", (7, 5), 15.0)
    from transformers import GPT2Config

    xl = GPT2Config(n_embd=1600, n_layer=48, n_head=25)  # gpt2-xl's shape, built here: the test stays offline
    config, notes = choose_presets(PreferConfig(model="gpt2-xl"), t4, set(), leave=("learning_rate",), model_config=xl)
    assert (
        config.method == "lora"
        and config.gradient_checkpointing
        and config.learning_rate == PreferConfig().learning_rate
    )
    assert notes and "learning-rate" not in notes[0]
    assert choose_precision("auto", t4)[0] == "fp16"


@pytest.mark.gpu
def test_fp16_preference_tuning_on_a_gpu(style_task, votes, tmp_path):
    code, metrics, err = run_cli(
        prefer_argv(style_task["model"], votes[0], tmp_path, "--precision", "fp16", "--max-steps", "4")
    )
    assert code == 0, err
    assert metrics["precision"] == "fp16" and metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------------------


def only_ties(root: Path) -> Path:
    from gpt2ft.votes import init_votes_db, record_vote

    path = init_votes_db(root / "ties.sqlite")
    for question, answer in SEEN:
        record_vote(
            path,
            [{"role": "user", "content": question}],
            f"{POLITE} {answer}",
            f"{RUDE} {answer}",
            "m",
            "o",
            "tie",
            {"model": "m"},
        )
    return path


def no_layout(root: Path) -> Path:
    path = root / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    return path


def empty_prompt(root: Path) -> Path:
    path = root / "prefs.jsonl"
    rows = [{"prompt": q, "chosen": f"{POLITE} {a}", "rejected": f"{RUDE} {a}"} for q, a in QA]
    rows[4]["prompt"] = "   "
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def unpaired(root: Path) -> Path:
    path = root / "unpaired.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a, "label": True}) + "\n" for q, a in QA))
    return path


def not_sqlite(root: Path) -> Path:
    path = root / "votes.sqlite"
    path.write_text("these are not votes\n")
    return path


def without_votes_table(root: Path) -> Path:
    path = root / "other.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    return path


def bert_model(root: Path, model: Path) -> Path:
    folder = root / "bert"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    return folder


def template_without_eos(root: Path, model: Path) -> Path:
    folder = root / "no_eos"
    shutil.copytree(model, folder)
    (folder / "chat_template.jinja").write_text("{%- for message in messages %}{{ message['content'] }}\n{%- endfor %}")
    return folder


BAD_INPUTS = [
    ("votes without a decisive vote", {"data": only_ties}, [], "no decisive vote to learn from (6 votes: 6 tie)"),
    ("records in no layout", {"data": no_layout}, [], "chats.jsonl: no preference records: columns messages"),
    ("an empty prompt", {"data": empty_prompt}, [], "prefs.jsonl:5: prompt is empty"),
    ("unpaired records for DPO", {"data": unpaired}, [], "use --algorithm kto"),
    ("a database that is not SQLite", {"data": not_sqlite}, [], "votes.sqlite: not an SQLite database"),
    ("a database without the votes table", {"data": without_votes_table}, [], "no such table: votes"),
    ("a model of an unsupported family", {"model": bert_model}, [], "model_type 'bert'"),
    ("a missing model folder", {"model": lambda root, model: root / "nowhere" / "model"}, [], "no such model folder"),
    (
        "a chat template that does not end a reply with EOS",
        {"model": template_without_eos},
        [],
        "does not end a reply with '<|endoftext|>'",
    ),
    ("the output folder is the model", {"output": lambda root, model: model}, [], "is the model being tuned (--model)"),
    (
        "KTO with one example a batch",
        {},
        ["--algorithm", "kto", "--batch-size", "1"],
        "--batch-size: KTO needs at least 2",
    ),
    ("a bad beta", {}, ["--beta", "0"], "--beta: must be > 0"),
    ("an unknown algorithm", {}, ["--algorithm", "ppo"], "--algorithm"),
]


@pytest.mark.parametrize("case, breaks, flags, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_nothing_is_written(
    case, breaks, flags, message, style_task, votes, tmp_path, capsys
):
    model = breaks["model"](tmp_path, style_task["model"]) if "model" in breaks else style_task["model"]
    data = breaks["data"](tmp_path) if "data" in breaks else votes[0]
    argv = prefer_argv(model, data, tmp_path / "run", *flags)
    if "output" in breaks:
        argv += ["--output-dir", str(breaks["output"](tmp_path, style_task["model"]))]
    listing = sorted(p.name for p in Path(style_task["model"]).iterdir())
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, captured.err
    assert message in lines[0] and "Traceback" not in captured.err
    for name in ("preferred", "logs", "images", "preferred.checkpoints"):
        assert not (tmp_path / "run" / name).exists(), name
    assert sorted(p.name for p in Path(style_task["model"]).iterdir()) == listing  # the starting model untouched


def test_equal_replies_are_skipped_and_counted_not_fatal(style_task, tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": q}], "chosen": f"{POLITE} {a}", "rejected": f"{RUDE} {a}"}
        for q, a in QA
    ] * 3
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, metrics, err = run_cli(
        prefer_argv(style_task["model"], path, tmp_path, "--max-steps", "2", "--logging-steps", "1")
    )
    assert code == 0, err
    assert (
        metrics["data_counts"]["skipped"] == {"chosen equals rejected": 1} and "1 chosen equals rejected skipped" in err
    )


# --------------------------------------------------------------------------------------------------------------
# Charts, the notebook
# --------------------------------------------------------------------------------------------------------------


def test_charts_rebuild_the_preference_chart_from_the_logs(dpo_run, tmp_path):
    code, _, err = run_cli(["charts", "--logs-dir", str(dpo_run["logs"]), "--images-dir", str(tmp_path / "images")])
    assert code == 0, err
    assert (tmp_path / "images" / "chart_prefer.png").stat().st_size > 1000
    from gpt2ft.charts import write_preference_chart

    empty = write_preference_chart(tmp_path / "no_logs", tmp_path / "empty")  # missing logs: a chart saying so
    assert empty.name == "chart_prefer.png" and empty.stat().st_size > 1000


def test_the_notebook_parameters_agree_with_prefer_config_and_default_to_off(capsys):
    import ast

    import nbformat

    from gpt2ft.notebook import prefer_in_notebook, preference_table

    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "GPT2_fine_tuning.ipynb", as_version=4)
    cell = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}
    assert values["preference_tuning"] is False and values["preference_data"] is None
    assert (
        values["preference_algorithm"] == PreferConfig().algorithm
        and values["preferred_dir"] == PreferConfig().output_dir
    )
    assert prefer_in_notebook("gpt2_finetuned", enabled=False) is None and preference_table(None) is None
    assert "preference_tuning = True" in capsys.readouterr().out


def test_the_preference_card_renders_whatever_is_missing():
    from gpt2ft.modelcard import render_preference_card

    card = render_preference_card({}, {}, [])
    assert card.startswith("---\n") and "# GPT-2 preference-tuned with DPO" in card and "n/a" in card
    kto = render_preference_card(
        {
            "algorithm": "kto",
            "reward_accuracy_after": 0.75,
            "data_counts": {"winners": {"votes": 9, "a": 3, "b": 2, "tie": 1, "both_bad": 3}},
        },
        {"started_from": "gpt2"},
        [
            {"prompt": [{"role": "user", "content": "Hi"}], "reply": "Hello", "completion": "Go away", "label": False},
        ],
    )
    assert "KTO" in kto and "0.750" in kto and "3 'both are bad'" in kto and "Judged undesirable in the data" in kto
    assert "base_model: gpt2" in kto  # a Hub id goes into the metadata


def test_a_prompt_too_long_keeps_its_latest_turns_and_a_reply_too_long_is_skipped(tiny_tokenizer):
    from gpt2ft.chat_format import render_ids
    from gpt2ft.prefer import trim_records
    from gpt2ft.preferences import SKIP_TOO_LONG, Skips

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{q} {a}"} for i, (q, a) in enumerate(QA[:5])]
    reply = [{"role": "assistant", "content": "Sure."}]
    record = {"prompt": turns, "chosen": reply, "rejected": [{"role": "assistant", "content": "No."}], "key": "k"}
    whole = len(render_ids(tiny_tokenizer, turns + reply))
    window = whole - len(render_ids(tiny_tokenizer, turns[:1])) + 3  # room for all but the first turn
    skips = Skips()
    fitted = trim_records(
        [record, {**record, "chosen": [{"role": "assistant", "content": "word " * 400}]}],
        tiny_tokenizer,
        window,
        skips,
        "train",
    )
    assert len(fitted) == 1 and fitted[0]["prompt"] == turns[1:]  # the oldest turn dropped, the latest kept whole
    assert len(render_ids(tiny_tokenizer, fitted[0]["prompt"] + reply)) <= window
    assert skips.counts == {SKIP_TOO_LONG: 1} and "train record 1" in skips.lines()[0]


# --------------------------------------------------------------------------------------------------------------
# A handful of votes: the run moves the model, or says it did not
# --------------------------------------------------------------------------------------------------------------


def test_ten_votes_at_the_default_settings_move_the_model_and_say_how_few_pairs_there_are(style_task, tmp_path):
    """Ten votes make a run of a few steps: the warm-up no longer swallows them (transformers' first step runs at
    learning rate 0), so the saved weights differ from the start, and the console says how few pairs there are."""
    path = tmp_path / "votes.sqlite"
    write_style_votes(path, count=10, seed=3)
    code, metrics, err = run_cli(prefer_argv(style_task["model"], path, tmp_path, "--logging-steps", "1"))
    assert code == 0, err
    assert metrics["weights_changed"] is True and metrics["weights_max_change"] > 1e-7
    pairs = metrics["data_counts"]["train"]["used"]
    assert 0 < pairs < 10 and f"only {pairs} training pairs" in err
    assert metrics["steps"] <= 6  # a few steps: what the warm-up cap is for
    log = read_jsonl(tmp_path / "logs" / "train_log.jsonl")
    rates = [record["learning_rate"] for record in log if "learning_rate" in record]
    assert rates and all(rate > 0 for rate in rates)
    before = dict(load_file(str(style_task["model"] / "model.safetensors")))
    after = load_file(str(tmp_path / "preferred" / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in after if name in before)


def test_a_run_that_cannot_move_the_weights_says_so_and_exits_non_zero_unless_allowed(style_task, tmp_path):
    """At a learning rate far too small for its steps the saved model equals the start: a warning in the console,
    weights_changed false in metrics.json, a warning in the card, exit 2; the model is saved all the same, and
    --allow-unchanged exits 0. No checkpoint of such weights is taken for the best one."""
    path = tmp_path / "votes.sqlite"
    write_style_votes(path, count=10, seed=3)
    flags = ("--learning-rate", "1e-30", "--epochs", "2", "--keep-checkpoints")
    code, _, err = run_cli(prefer_argv(style_task["model"], path, tmp_path / "strict", *flags))
    assert code == 2 and "equals the starting model" in err and "--allow-unchanged" in err
    metrics = json.loads((tmp_path / "strict" / "logs" / "metrics.json").read_text())
    assert metrics["weights_changed"] is False and metrics["weights_max_change"] <= 1e-7
    assert (tmp_path / "strict" / "preferred" / "model.safetensors").is_file()
    card = (tmp_path / "strict" / "preferred" / "README.md").read_text()
    assert "**Warning:** the saved weights equal the starting model's" in card
    for checkpoint in complete_checkpoints(checkpoint_dir(tmp_path / "strict" / "preferred")):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["best_global_step"] in (None, 0) and state["best_model_checkpoint"] is None

    code, metrics, err = run_cli(
        prefer_argv(style_task["model"], path, tmp_path / "allowed", *flags, "--allow-unchanged")
    )
    assert code == 0, err
    assert metrics["weights_changed"] is False and "equals the starting model" in err
