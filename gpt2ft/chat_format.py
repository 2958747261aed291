"""The conversation format gpt2ft trains on, as a chat template every saved model carries.

    python -m gpt2ft train ...      # the saved tokenizer gets CHAT_TEMPLATE (chat_template.jinja)

The format is DialoGPT's: `<|endoftext|>turn 1<|endoftext|>turn 2<|endoftext|>...`: EOS first, then every turn
followed by EOS, with no role names. A system message is rendered the same way, as the first turn (its text
followed by EOS), and is never a training target: it is context only. `add_generation_prompt=True` adds nothing,
because after the last EOS the model already stands at the start of the next turn. Assistant turns (with their
closing EOS) sit inside `{% generation %}` markers, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
marks exactly the tokens that `--loss-on assistant` trains on.

Rendering with the template and tokenising turn by turn give the same token ids: GPT-2's tokenizer splits the text
at `<|endoftext|>` before its byte-level BPE, so each turn is tokenised on its own either way (tested on real
dialogues in tests/test_chat_format.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Contents are trimmed in the template as they are when data is loaded, so a stray space typed in a chat box
# renders as in training.
CHAT_TEMPLATE = (
    "{{- eos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim }}{{ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def as_messages(
    conversation: Sequence[str | Mapping[str, Any]], roles: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """A conversation as chat messages (role and content only: what a chat template reads).

    Takes a prepared record's messages as they are (conversations.Conversation: role "" for plain turns, labels
    dropped), other {"role", "content"} messages, or plain strings, which take their role from `roles`. A turn
    with no role (DailyDialog) gets one by position: the last turn is the user's (the turn being answered) and
    the roles alternate backwards from it.
    """
    messages = []
    count = len(conversation)
    for index, turn in enumerate(conversation):
        if isinstance(turn, Mapping):
            role, content = turn.get("role") or "", turn["content"]
        else:
            role, content = (roles[index] if roles is not None and index < len(roles) else "") or "", turn
        messages.append(
            {"role": role or ("user" if (count - 1 - index) % 2 == 0 else "assistant"), "content": str(content)}
        )
    return messages


def ensure_chat_template(tokenizer: Any) -> Any:
    """Give the tokenizer gpt2ft's template when it has none (the base `gpt2`, models saved before templates);
    a model that brings its own template keeps it. Returns the tokenizer."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` in the model's chat template (gpt2ft's when it has none), ready for the next turn."""
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    return list(ids)
