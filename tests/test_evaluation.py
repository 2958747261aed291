"""gpt2ft.evaluation: honest token-weighted loss, reply metrics, and the before/after comparison."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2ft.cli import main
from gpt2ft.data import DialogueCollator
from gpt2ft.evaluation import distinct_n, evaluate_loss, has_repeated_ngram, perplexity, reply_metrics


def test_padded_batches_give_the_token_weighted_loss_of_the_unpadded_sequences(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    rows = [
        {"input_ids": [eos, 5, 6, 7, 8, 9, 10, eos], "labels": [-100, 5, 6, 7, 8, 9, 10, eos]},
        {"input_ids": [eos, 11, eos], "labels": [-100, 11, eos]},
        {"input_ids": [eos, 12, 13, eos], "labels": [-100, -100, 13, eos]},
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            loss = tiny_model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
            n = sum(label != -100 for label in row["labels"][1:])
            total, count = total + float(loss) * n, count + n
    for batching in ("pad", "pack"):
        # batch size 2: a mean of batch means would weight the 2-row and 1-row batches equally, and be wrong.
        result = evaluate_loss(tiny_model, rows, DialogueCollator(tiny_tokenizer, batching), batch_size=2)
        assert result["tokens"] == count == 11
        assert result["loss"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_is_exp_loss_with_an_overflow_guard():
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(1e6) == float("inf")


def test_distinct_n_on_hand_made_replies():
    texts = ["i am fine", "i am here"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # i, am, fine, here out of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (i am) twice, (am fine), (am here)
    assert distinct_n([], 2) == 0.0


def test_repeat_rate_and_eos_rate_on_hand_made_replies():
    replies = [
        {"reply": "yes yes yes yes", "tokens": 4, "ended_with_eos": True},  # "yes yes yes" occurs twice
        {"reply": "I think I think I think so", "tokens": 7, "ended_with_eos": False},
        {"reply": "sounds good to me", "tokens": 4, "ended_with_eos": True},
        {"reply": "", "tokens": 0, "ended_with_eos": True},
    ]
    assert has_repeated_ngram("a b c a b c") and not has_repeated_ngram("a b c d a b")
    metrics = reply_metrics(replies)
    assert metrics["samples"] == 4
    assert metrics["eos_rate"] == pytest.approx(3 / 4)
    assert metrics["mean_reply_tokens"] == pytest.approx(15 / 4)
    assert metrics["repeat_rate"] == pytest.approx(2 / 4)


def test_eval_samples_reports_reply_metrics_and_writes_triples(tiny_model_dir, dailydialog_dir, tmp_path, capsys):
    import json

    out = tmp_path / "samples.jsonl"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(dailydialog_dir),
            "--split",
            "test",
            "--max-dialogs",
            "6",
            "--samples",
            "4",
            "--samples-out",
            str(out),
            "--max-new-tokens",
            "5",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "samples",
        "eos_rate",
        "mean_reply_tokens",
        "distinct_1",
        "distinct_2",
        "repeat_rate",
        "loss",
        "perplexity",
    ):
        assert key in result
    assert result["samples"] == 4 and 0 <= result["eos_rate"] <= 1 and result["mean_reply_tokens"] <= 5
    triples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(triples) == 4 and {"context", "reference", "reply"} <= set(triples[0])
    assert isinstance(triples[0]["context"], list) and triples[0]["context"]


def test_compare_prints_both_rows(tiny_model_dir, dailydialog_dir, capsys):
    code = main(
        [
            "compare",
            "--base",
            str(tiny_model_dir),
            "--tuned",
            str(tiny_model_dir),
            "--data",
            str(dailydialog_dir),
            "--max-dialogs",
            "4",
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--greedy",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("decoding (every model): ") and "do_sample=False" in lines[1]
    table = lines[2:]
    assert table[0].startswith("| model | perplexity | eos_rate")
    assert table[2].startswith("| base |") and table[3].startswith("| fine-tuned |")
    assert table[2].split("|")[2] == table[3].split("|")[2]  # same model, same data: same perplexity


def test_chunked_scoring_equals_the_models_own_loss(tiny_model, tiny_tokenizer, monkeypatch):
    """Evaluation computes logits a few positions at a time: the same loss as model(labels=...)."""
    import gpt2ft.loss
    from gpt2ft.evaluation import batch_nll

    ids = tiny_tokenizer(["Hello , how are you ? I am fine , thanks ."] * 2, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[0, :3] = -100  # some positions are not scored
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, labels=labels).loss
        monkeypatch.setattr(gpt2ft.loss, "LOSS_CHUNK", 7)  # several chunks, the last one partial
        total, count = batch_nll(tiny_model, {"input_ids": ids, "labels": labels})
    assert int(count) == int((labels[:, 1:] != -100).sum()) and ids.numel() % 7 != 0
    torch.testing.assert_close(total / count, expected, atol=1e-5, rtol=0)


def test_samples_of_role_data_ask_for_the_assistants_turn(tiny_model, tiny_tokenizer):
    from gpt2ft.conversations import Conversation, messages_from_turns
    from gpt2ft.data import dialogs_dataset
    from gpt2ft.evaluation import cut_point, sample_replies

    assert cut_point(["a", "b", "c", "d"]) == 2 and cut_point(["a"]) is None  # plain turns: the first half
    assert cut_point(["s", "q", "a"], ["system", "user", "assistant"]) == 2
    assert cut_point(["q1", "a1", "q2", "a2"], ["user", "assistant", "user", "assistant"]) == 3
    assert cut_point(["q1", "a1", "q2", "a2", "q3"], ["user", "assistant", "user", "assistant", "user"]) == 3
    assert cut_point(["q", "q"], ["user", "user"]) is None
    dialogs = dialogs_dataset(
        [
            Conversation(messages_from_turns(["Be brief.", "Hello", "Hi there"], ["system", "user", "assistant"])),
            Conversation(
                messages_from_turns(
                    ["Hello", "Hi", "How are you?", "Fine."], ["user", "assistant", "user", "assistant"]
                )
            ),
        ]
    )
    records = sample_replies(tiny_model, tiny_tokenizer, dialogs, 2, greedy=True, max_new_tokens=3)
    assert [r["reference"] for r in records] == ["Hi there", "Fine."]
    assert records[0]["roles"] == ["system", "user"] and records[1]["roles"] == ["user", "assistant", "user"]


def test_a_process_with_no_rows_to_score_returns_nothing_instead_of_failing(tiny_model, tiny_tokenizer):
    """Under data parallelism with fewer held-out rows than processes, one process's share is empty."""
    from gpt2ft.data import DialogueCollator
    from gpt2ft.evaluation import evaluate_loss

    rows = [{"input_ids": [0, 5, 6, 0], "labels": [-100, 5, 6, 0]}]
    result = evaluate_loss(
        tiny_model, rows, DialogueCollator(tiny_tokenizer, "pack"), batch_size=4, rank=1, world_size=2
    )
    assert result["tokens"] == 0 and result["loss"] != result["loss"]  # NaN: nothing scored here


def test_compare_decodes_both_models_with_one_explicit_config_whatever_they_saved(tiny_model_dir, tmp_path):
    """A base model whose saved generation config is greedy used to be decoded greedily beside a sampling tuned
    model. comparison_decoding leaves nothing to a model's own config, and both models get exactly the same
    generate() settings."""
    import shutil

    from transformers import GenerationConfig

    from gpt2ft import evaluation
    from gpt2ft.evaluation import compare_models, comparison_decoding
    from gpt2ft.generate import GENERATION_DEFAULTS

    greedy_base = tmp_path / "greedy_base"
    shutil.copytree(tiny_model_dir, greedy_base)
    GenerationConfig(do_sample=False, max_new_tokens=3).save_pretrained(greedy_base)
    decoding = comparison_decoding(seed=None, temperature=0.7, max_new_tokens=None)
    assert decoding["do_sample"] is True and decoding["temperature"] == 0.7 and decoding["seed"] == 0
    assert decoding["top_p"] == GENERATION_DEFAULTS["top_p"] and decoding["max_new_tokens"] == 50
    assert comparison_decoding(greedy=True)["do_sample"] is False

    seen = []

    def spy(model, tokenizer, dialogs, samples, **settings):
        seen.append(settings)
        return {}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "evaluate_replies", spy)
        patch.setattr(evaluation, "evaluate_dialogs", lambda *a, **k: {"loss": 1.0, "perplexity": 2.7})
        compare_models({"base": str(greedy_base), "fine-tuned": str(tiny_model_dir)}, None, samples=2, **decoding)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0]["do_sample"] is True and seen[0]["temperature"] == 0.7


def test_compare_defaults_to_the_recorded_start_and_names_the_flag_typed(trained_run, tiny_model_dir, tmp_path, capsys):
    """--base defaults to the model the tuned folder records as its start (not `gpt2`), and an error about either
    model names the flag that named it."""
    from gpt2ft.config import recorded_start

    dirs, _ = trained_run
    tuned = dirs["output"]
    start = recorded_start(tuned)
    assert start == str(tiny_model_dir)
    argv = ["compare", "--tuned", tuned, "--cache-dir", dirs["cache"], "--max-dialogs", "2", "--samples", "0"]
    assert main(argv) == 0
    assert f"models: base = {start} (the start recorded in --tuned), fine-tuned = {tuned}" in capsys.readouterr().out

    assert main([*argv, "--base", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --base {tmp_path / 'nowhere'}: no such model folder")
    assert main(["compare", "--tuned", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --tuned {tmp_path / 'gone'}: no such model folder")
    assert main(["compare", "--tuned", str(tiny_model_dir)]) == 2  # a folder gpt2ft did not train records no start
    assert capsys.readouterr().err.startswith("error: --base: ")
