"""gpt2ft.chat_format: the chat template renders a conversation to exactly the training tokens, marks exactly the
training targets under --loss-on assistant, and makes a saved model answer `pipeline(messages)`."""

from __future__ import annotations

import pytest
from conftest import make_conversations, write_conversations
from datasets import Dataset

from gpt2ft.chat_format import CHAT_TEMPLATE, as_messages, ensure_chat_template
from gpt2ft.conversations import Conversation, messages_from_turns, roles_of, turns_of
from gpt2ft.data import IGNORE_INDEX, dialogs_dataset, prepare_dialogs, tokenize_dialogs


def template_ids(tokenizer, messages, with_mask=False):
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=with_mask
    )
    return (out["input_ids"], out["assistant_masks"]) if with_mask else out["input_ids"]


def prepared_messages(dialogs: Dataset) -> list[list[dict[str, str]]]:
    """Each prepared conversation as chat messages, spelled out here (not with as_messages) so the test checks the
    rule: a turn without a role alternates backwards from the last, the user's."""
    return [
        [
            {"role": role or ("user" if (len(turns) - 1 - i) % 2 == 0 else "assistant"), "content": turn}
            for i, (turn, role) in enumerate(zip(turns, roles))
        ]
        for turns, roles in ((turns_of(m), roles_of(m)) for m in dialogs["messages"])
    ]


def check_template_equals_training(tokenizer, dialogs: Dataset, loss_on: str) -> int:
    """For every dialogue: template ids == training ids, and (under assistant) template mask == training targets."""
    rows = tokenize_dialogs(dialogs, tokenizer, max_length=100_000, loss_on=loss_on)
    assert len(rows) == len(dialogs)  # one window each: the comparison is whole dialogues
    checked = 0
    for messages, row in zip(prepared_messages(dialogs), rows):
        ids, mask = template_ids(tokenizer, messages, with_mask=True)
        assert ids == row["input_ids"], messages
        if loss_on == "assistant":
            assert mask == [int(label != IGNORE_INDEX) for label in row["labels"]], messages
        checked += 1
    return checked


def test_the_template_renders_the_training_format(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|endoftext|>Be kind.<|endoftext|>Hi<|endoftext|>Hello.<|endoftext|>"
    # Nothing is added for the next turn: after the last EOS the model already stands at its start.
    assert (
        tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
        == "<|endoftext|>Be kind.<|endoftext|>Hi<|endoftext|>"
    )


def test_turns_without_roles_alternate_and_end_with_the_user():
    assert [m["role"] for m in as_messages(["a", "b", "c"])] == ["user", "assistant", "user"]
    assert [m["role"] for m in as_messages(["a", "b"])] == ["assistant", "user"]
    kept = as_messages([{"role": "system", "content": "s"}, "q"])
    assert kept == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    # A prepared record's messages as they are: plain turns (role "") alternate, labels are not passed on.
    record = [
        {"role": "", "content": "a", "emotion": "anger", "act": "inform"},
        {"role": "", "content": "b", "emotion": None, "act": None},
    ]
    assert as_messages(record) == [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]


def test_a_model_with_its_own_template_keeps_it(tiny_tokenizer):
    import copy

    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"
    assert ensure_chat_template(other).chat_template == "{{ messages[0]['content'] }}"
    other.chat_template = None
    assert ensure_chat_template(other).chat_template == CHAT_TEMPLATE


def test_template_tokens_and_assistant_mask_equal_training_on_role_data(tmp_path, tiny_tokenizer):
    path = write_conversations(tmp_path / "chats.jsonl", make_conversations(60, 0))
    prepared = prepare_dialogs(str(path), cache_dir=tmp_path / "cache", validation_fraction=0.2, test_fraction=0.2)
    assert prepared.has_roles and prepared.loss_on == "assistant"
    checked = sum(
        check_template_equals_training(tiny_tokenizer, prepared.dialogs[split], "assistant")
        for split in prepared.dialogs
    )
    assert checked == sum(len(prepared.dialogs[split]) for split in prepared.dialogs) > 30
    assert any("system" in roles_of(messages) for messages in prepared.dialogs["train"]["messages"])


def test_template_tokens_equal_training_on_real_dialogues(shared_data):
    from gpt2ft.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(shared_data / "gpt2-tokenizer"))
    prepared = prepare_dialogs(
        str(shared_data / "dailydialog"), cache_dir=None, max_train_dialogs=300, max_eval_dialogs=100
    )
    checked = sum(
        check_template_equals_training(tokenizer, prepared.dialogs[split], "all") for split in prepared.dialogs
    )
    assert checked == 500
    # Real conversations written as chat messages with roles: the mask is exactly the assistant-only labels.
    dialogs = prepared.dialogs["validation"]
    with_roles = dialogs_dataset(
        [
            Conversation(messages_from_turns(turns, ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]))
            for turns in (turns_of(messages) for messages in dialogs["messages"])
        ]
    )
    assert check_template_equals_training(tokenizer, with_roles, "assistant") == 100


@pytest.fixture(scope="module")
def saved_model(trained_run):
    dirs, _ = trained_run
    return dirs["output"]


def test_pipeline_answers_chat_messages_and_stops_at_eos(saved_model):
    from transformers import pipeline

    from gpt2ft.generate import generate_reply, load_for_generation

    chat = pipeline("text-generation", model=saved_model)
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    conversation = chat(messages, do_sample=False, max_new_tokens=40)[0]["generated_text"]
    assert conversation[:-1] == messages and conversation[-1]["role"] == "assistant"
    reply = conversation[-1]["content"]
    assert "<|endoftext|>" not in reply
    model, tokenizer = load_for_generation(saved_model)
    ours = generate_reply(model, tokenizer, messages, greedy=True, max_new_tokens=40)
    assert ours.ended_with_eos and ours.text == reply.strip()  # the pipeline stopped where gpt2ft does: at EOS
