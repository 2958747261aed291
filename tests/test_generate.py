"""gpt2ft.generate: prompts, stopping at EOS, decoding defaults, chat, and loading with plain transformers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2ft.checkpoints import save_final_model
from gpt2ft.cli import main
from gpt2ft.generate import Reply, build_generation_config, build_prompt_ids, chat, generate_reply

ROOT = Path(__file__).resolve().parents[1]


def force_next_token(model, token_id: int) -> None:
    """Set the weights so that `token_id` is the top prediction after any input."""
    with torch.no_grad():
        direction = torch.ones(model.config.n_embd) / model.config.n_embd**0.5
        model.transformer.wte.weight[token_id] = 10 * direction  # lm_head is tied to wte
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)


@pytest.fixture
def forced_model_dir(tmp_path, tiny_model, tiny_tokenizer):
    """A saved tiny model that always predicts the token of "Hi" (so replies run to max_new_tokens)."""
    token = tiny_tokenizer("Hi", add_special_tokens=False)["input_ids"][0]
    force_next_token(tiny_model, token)
    save_final_model(
        tiny_model, tiny_tokenizer, build_generation_config(tiny_tokenizer), {"gpt2ft_version": "t"}, tmp_path / "m"
    )
    return tmp_path / "m"


def test_prompt_keeps_the_most_recent_whole_turns(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    history = ["first turn here", "second", "third turn is the longest of all", "last"]
    turn_ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in history]
    budget = 1 + len(turn_ids[2]) + len(turn_ids[3]) + 1  # room for the last two turns, not three
    ids = build_prompt_ids(tiny_tokenizer, history, budget)
    assert ids == [eos] + turn_ids[2] + turn_ids[3]
    assert tiny_tokenizer.decode(ids) == "<|endoftext|>third turn is the longest of all<|endoftext|>last<|endoftext|>"
    everything = build_prompt_ids(tiny_tokenizer, history, 1000)
    assert everything == [eos] + sum(turn_ids, [])


def test_an_oversized_latest_turn_keeps_its_end(tiny_tokenizer):
    ids = build_prompt_ids(tiny_tokenizer, ["old", "word " * 50], 10)
    assert len(ids) == 10 and ids[-1] == tiny_tokenizer.eos_token_id


def test_generation_stops_at_eos(tiny_model, tiny_tokenizer):
    force_next_token(tiny_model, tiny_tokenizer.eos_token_id)
    reply = generate_reply(tiny_model, tiny_tokenizer, ["Hello, how are you?"], max_new_tokens=20)
    assert reply == Reply(text="", tokens=0, ended_with_eos=True)


def test_generation_without_eos_runs_to_max_new_tokens(forced_model_dir):
    from gpt2ft.generate import load_for_generation

    model, tokenizer = load_for_generation(str(forced_model_dir))
    reply = generate_reply(model, tokenizer, ["Hello"], greedy=True, max_new_tokens=7)
    assert reply.tokens == 7 and not reply.ended_with_eos and reply.text.startswith("Hi")


def test_seeded_sampling_is_reproducible(tiny_model, tiny_tokenizer):
    tiny_model.generation_config = build_generation_config(tiny_tokenizer)
    first = generate_reply(tiny_model, tiny_tokenizer, ["Hello"], seed=3, max_new_tokens=12)
    second = generate_reply(tiny_model, tiny_tokenizer, ["Hello"], seed=3, max_new_tokens=12)
    assert first == second


def test_generation_defaults_suit_dialogue(tiny_tokenizer):
    config = build_generation_config(tiny_tokenizer)
    assert config.do_sample and 0 < config.top_p < 1 and 0 < config.temperature <= 1
    assert not config.no_repeat_ngram_size and 40 <= config.max_new_tokens <= 60  # no prompt-wide ban: see below
    assert config.eos_token_id == config.pad_token_id == tiny_tokenizer.eos_token_id


def test_chat_answers_each_line_and_honours_reset_and_quit():
    seen_histories = []

    def fake_reply(model, tokenizer, history, **decoding):
        seen_histories.append(list(history))
        return Reply(text=f"reply {len(seen_histories)}", tokens=2, ended_with_eos=True)

    lines = io.StringIO("Hi\nHow are you?\n/reset\n\nAgain\n/quit\nnever answered\n")
    written = []
    count = chat(None, None, lines, written.append, reply_fn=fake_reply)
    assert count == 3
    assert written == ["reply 1", "reply 2", "(conversation reset)", "reply 3"]
    turns = [[message["content"] for message in history] for history in seen_histories]
    assert turns == [["Hi"], ["Hi", "reply 1", "How are you?"], ["Again"]]
    assert [message["role"] for message in seen_histories[1]] == ["user", "assistant", "user"]


def test_chat_command_over_piped_stdin(forced_model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2ft",
            "chat",
            "--model",
            str(forced_model_dir),
            "--greedy",
            "--max-new-tokens",
            "3",
            "--system",
            "Be brief.",
        ],
        input="Hi, how are you?\nWhat do you do for a living?\n/quit\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    # The second reply may say what the first said: the repetition guard looks at the reply only, not the prompt.
    assert replies == ["HiHiHi", "HiHiHi"]


def test_saved_model_works_with_pipeline_and_the_original_example(forced_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    generator = pipeline("text-generation", model=str(forced_model_dir), tokenizer=str(forced_model_dir))
    text = generator("Hello", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text == "HelloHiHiHi"
    model = AutoModelForCausalLM.from_pretrained(str(forced_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(forced_model_dir))
    inputs = tokenizer("Hello" + tokenizer.eos_token, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(output[0], skip_special_tokens=True) == "HelloHiHi"


def test_generate_command_rejects_bad_decoding_flags(forced_model_dir, capsys):
    assert main(["generate", "--model", str(forced_model_dir), "--max-new-tokens", "0", "Hi"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_a_system_message_starts_every_conversation():
    seen = []

    def fake_reply(model, tokenizer, history, **decoding):
        seen.append(list(history))
        return Reply("ok", 1, True)

    chat(None, None, io.StringIO("Hi\n/reset\nAgain\n"), lambda text: None, reply_fn=fake_reply, system="Be brief.")
    assert [history[0] for history in seen] == [{"role": "system", "content": "Be brief."}] * 2
    assert [message["content"] for message in seen[1]] == ["Be brief.", "Again"]  # /reset keeps the system message


def test_the_system_message_is_the_first_turn_of_the_prompt(tiny_tokenizer):
    ids = build_prompt_ids(
        tiny_tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 100
    )
    assert tiny_tokenizer.decode(ids) == "<|endoftext|>Be brief.<|endoftext|>Hi<|endoftext|>"
    # When the window is short, older turns go first; the system message stays while it fits.
    from gpt2ft.chat_format import render_ids

    long = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user", "content": f"turn {i} " * 5} for i in range(6)
    ]
    budget = len(render_ids(tiny_tokenizer, long[:1] + long[-2:]))  # room for the system message and two turns
    cut = tiny_tokenizer.decode(build_prompt_ids(tiny_tokenizer, long, budget))
    assert cut.startswith("<|endoftext|>Be brief.<|endoftext|>turn 4") and "turn 5" in cut and "turn 3" not in cut


def test_the_repetition_guard_looks_at_the_reply_only(tiny_tokenizer):
    """transformers' no_repeat_ngram_size bans every 4-gram of the prompt, EOS included: a reply that ends like an
    earlier turn ("Thank you.<EOS>" again) could not end. gpt2ft's guard bans repeats inside the reply only."""
    from transformers import NoRepeatNGramLogitsProcessor

    from gpt2ft.generate import ReplyNoRepeatNGram

    eos = tiny_tokenizer.eos_token_id
    thanks = tiny_tokenizer("Thank you.", add_special_tokens=False)["input_ids"][-3:]
    prompt = [eos] + thanks + [eos] + tiny_tokenizer("Here is your tea.", add_special_tokens=False)["input_ids"] + [eos]
    ids = torch.tensor([prompt + thanks])  # the reply so far repeats the earlier turn's last three tokens
    scores = torch.zeros(1, len(tiny_tokenizer))
    assert NoRepeatNGramLogitsProcessor(4)(ids, scores.clone())[0, eos] == -float("inf")  # the defect
    assert ReplyNoRepeatNGram(4, len(prompt))(ids, scores.clone())[0, eos] == 0  # may end its turn
    looping = torch.tensor([prompt + thanks + [eos] + thanks])  # a 4-gram twice inside the reply is still banned
    assert ReplyNoRepeatNGram(4, len(prompt))(looping, scores.clone())[0, eos] == -float("inf")


def test_replies_use_the_reply_only_guard_even_on_older_models(tiny_model, tiny_tokenizer):
    from gpt2ft.generate import ReplyNoRepeatNGram

    tiny_model.generation_config.no_repeat_ngram_size = 4  # as models saved before this change carry it
    seen = {}
    real = tiny_model.generate

    def generate(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    tiny_model.generate = generate
    generate_reply(tiny_model, tiny_tokenizer, ["Hello"], greedy=True, max_new_tokens=3)
    assert seen["no_repeat_ngram_size"] == 0
    assert [type(p) for p in seen["logits_processor"]] == [ReplyNoRepeatNGram] and seen["logits_processor"][0].size == 4
    generate_reply(tiny_model, tiny_tokenizer, ["Hello"], greedy=True, max_new_tokens=3, no_repeat_ngram_size=0)
    assert seen["logits_processor"] is None  # --no-repeat-ngram-size 0 turns the guard off
