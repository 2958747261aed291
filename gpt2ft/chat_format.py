"""The conversation format gpt2ft trains in: the model's own chat template when it has one, gpt2ft's otherwise; and
how a rendered conversation becomes the turns of tokens that training rows are cut from.

    python -m gpt2ft train --model gpt2 ...          # no template: the saved tokenizer gets CHAT_TEMPLATE
    python -m gpt2ft train --model ./SmolLM2 ...     # its ChatML template: the fine-tune and the template agree

gpt2ft's format (CHAT_TEMPLATE) is DialoGPT's: `<|endoftext|>turn 1<|endoftext|>turn 2<|endoftext|>...`: EOS first,
then every turn followed by EOS, with no role names. A system message is rendered the same way, as the first turn,
and is never a training target: it is context only. `add_generation_prompt=True` adds nothing, because after the
last EOS the model already stands at the start of the next turn. Assistant turns (with their closing EOS) sit
inside `{% generation %}` markers, so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the
tokens that `--loss-on assistant` trains on.

A model's own template (ChatML, Llama 3's, Qwen's) is used as it is. `render_conversation` renders a conversation
to text once and finds, in that text, each message's content and the end-of-turn token after it
(`end_of_turn`: `<|im_end|>`, `<|eot_id|>`, GPT-2's EOS): a turn is everything from the previous end of turn to its
own, and its targets are its content and its end-of-turn token, never the template's header before the content
(`<|im_start|>assistant\n` is what the model is given when it is asked for a reply). What comes before the first
turn (gpt2ft's leading EOS, a template's default system message) is the conversation's head, which every training
window starts with. The whole text is tokenised in one call, and tokens are assigned to turns by their character
offsets, so the ids are exactly the template's (tests/test_chat_format.py checks GPT-2's format against tokenising
turn by turn, on real dialogues, and ChatML against SmolLM2's template).

Every rendering goes through `apply_template`, so a template that fails (a sandbox refusal, its own
`raise_exception`) is one ModelError line in every command; `check_template` renders a short probe once when a
tokenizer loads, in a worker thread with a time limit, so a template that fails on any conversation, or takes
longer than TEMPLATE_TIME_LIMIT_S (a loop of 10**10), is refused before anything runs.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelError

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


TEMPLATE_TIME_LIMIT_S = 2.0  # a short conversation renders in milliseconds with any real template


def apply_template(tokenizer: Any, messages: Sequence[Mapping[str, str]], **options: Any) -> Any:
    """`tokenizer.apply_chat_template` in the tokenizer's template (gpt2ft's when it has none): the one place gpt2ft
    renders a conversation.

    Raises:
        ModelError: the template fails on this conversation (a sandbox refusal, its own raise_exception, a bad
            expression), naming the model and the template's message.
    """
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template_of(tokenizer), **options)
    except Exception as error:  # noqa: BLE001 - whatever the template raises is the template's failure
        lines = str(error).strip().splitlines() or ["no details"]
        raise ModelError(
            f"--model {tokenizer.name_or_path}: its chat template cannot render the conversation "
            f"({type(error).__name__}: {lines[0]})"
        ) from None


class TemplateStopped(BaseException):
    """Raised inside the probe's worker thread to end a template that renders past the time limit (a BaseException,
    so no `except Exception` in the template engine swallows it)."""


def stop_thread(thread: threading.Thread) -> None:
    """End a thread running Python code (a template's loops are Python loops) by raising TemplateStopped in it at
    its next bytecode: a thread cannot be killed, and the probe's must not spin on after the template is refused."""
    for _ in range(50):
        if not thread.is_alive() or thread.ident is None:
            return
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(TemplateStopped))
        thread.join(0.1)


def check_template(tokenizer: Any, seconds: float = TEMPLATE_TIME_LIMIT_S) -> None:
    """Render a short probe conversation (user, assistant, user, with and without the generation prompt) in the
    tokenizer's chat template, in a worker thread given `seconds`: once, when a tokenizer loads.

    Raises:
        ModelError: the template fails on the probe, or takes longer than `seconds` (it is stopped).
    """
    if template_of(tokenizer) == CHAT_TEMPLATE:
        return  # gpt2ft's own renders in microseconds
    probe = [
        {"role": "user", "content": "gpt2ft-probe-question"},
        {"role": "assistant", "content": PROBE},
        {"role": "user", "content": "gpt2ft-probe-question"},
    ]
    outcome: dict[str, BaseException] = {}

    def render() -> None:
        try:
            apply_template(tokenizer, probe[:2], tokenize=False, add_generation_prompt=False)
            apply_template(tokenizer, probe, tokenize=False, add_generation_prompt=True)
        except BaseException as error:  # noqa: BLE001 - handed to the loading thread
            outcome["error"] = error

    worker = threading.Thread(target=render, name="gpt2ft-template-probe", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        stop_thread(worker)
        raise ModelError(
            f"--model {tokenizer.name_or_path}: its chat template takes more than {seconds:g} s to render a "
            "three-message conversation (a runaway loop?); fix the template (chat_template.jinja)"
        )
    if isinstance(outcome.get("error"), ModelError):
        raise outcome["error"]


def render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], **template_args: Any) -> list[int]:
    """Token ids of `messages` in the model's chat template (gpt2ft's when it has none), ready for the next turn
    (`template_args`: the labels asked for, for a model trained with controls)."""
    return list(
        apply_template(
            tokenizer, messages, tokenize=True, add_generation_prompt=True, return_dict=False, **template_args
        )
    )


def template_of(tokenizer: Any) -> str:
    """The chat template the tokenizer renders with: its own, or gpt2ft's."""
    return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE


def describe_template(template: str | None) -> str:
    """Which format a template writes, for the card, the notebook and metrics.json: gpt2ft's, ChatML, Llama 3's, or
    another of the model's own."""
    template = template or CHAT_TEMPLATE
    if template == CHAT_TEMPLATE:
        return "gpt2ft (DialoGPT: EOS after every turn)"
    if "<|im_start|>" in template:
        return "ChatML (<|im_start|>/<|im_end|>), the model's own"
    if "<|start_header_id|>" in template:
        return "Llama 3 (<|start_header_id|>/<|eot_id|>), the model's own"
    return "the model's own"


PROBE = "gpt2ft-probe-reply"
_END_OF_TURN: dict[tuple[str, str], str] = {}


def end_of_turn(tokenizer: Any) -> str:
    """The token that ends a turn in the tokenizer's template: the first special token after a reply's text
    (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3, `<|endoftext|>` in gpt2ft's format); EOS when the template
    writes none. Found once per template, by rendering a two-message probe."""
    key = (template_of(tokenizer), str(tokenizer.eos_token))
    if key not in _END_OF_TURN:
        probe = [{"role": "user", "content": "gpt2ft-probe-question"}, {"role": "assistant", "content": PROBE}]
        after = render_text(tokenizer, probe).split(PROBE, 1)[-1]
        specials = set(tokenizer.all_special_tokens) | {str(token) for token in tokenizer.added_tokens_decoder.values()}
        found = [(after.find(token), token) for token in specials if token and token in after]
        _END_OF_TURN[key] = min(found)[1] if found else tokenizer.eos_token
    return _END_OF_TURN[key]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a reply: the template's end-of-turn token and EOS (one id when they are the same)."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(token) for token in ids if token is not None))


def render_text(tokenizer: Any, messages: Sequence[Mapping[str, str]], **template_args: Any) -> str:
    """A conversation rendered to text by the tokenizer's chat template (gpt2ft's when it has none), without a
    generation prompt: what training reads."""
    return apply_template(tokenizer, messages, tokenize=False, add_generation_prompt=False, **template_args)


@dataclass
class Spans:
    """Where a rendered conversation's parts are, in characters: the head ends at `head_end`; message i's content is
    `contents[i]` (start, end) and its turn ends after its end-of-turn token, at `ends[i]`."""

    head_end: int
    contents: list[tuple[int, int]]
    ends: list[int]


def find_spans(text: str, messages: Sequence[Mapping[str, str]], end_token: str) -> Spans:
    """Find each message, in order: its end-of-turn token, and its content right before it (only whitespace
    between). Found from the end of turn backwards, so text the template writes before the content (a header, a
    control tag) is never taken for it, whatever it says.

    Raises:
        ModelError: the template writes no end-of-turn token after a message, or changes a message's text (gpt2ft
            could not tell which tokens are the reply).
    """
    contents, ends, cursor = [], [], 0
    for number, message in enumerate(messages, 1):
        content = message["content"]
        stop = text.find(end_token, cursor)
        # The first end of turn with the content right before it: earlier ones close a template's head (gpt2ft's
        # leading EOS, a default system message).
        while stop != -1 and not text[cursor:stop].rstrip().endswith(content):
            stop = text.find(end_token, stop + len(end_token))
        if stop == -1:
            raise ModelError(
                f"the chat template does not write message {number}'s text as it is, followed by {end_token!r}; "
                "gpt2ft cannot train in it"
            )
        end = cursor + len(text[cursor:stop].rstrip())
        contents.append((end - len(content), end))
        cursor = stop + len(end_token)
        ends.append(cursor)
    head = text.rfind(end_token, 0, contents[0][0]) if contents else -1
    return Spans(head + len(end_token) if head != -1 else 0, contents, ends)


@dataclass
class Turn:
    """One turn's tokens: its ids, which of them are trainable (its content and end-of-turn token, not the header the
    template writes before the content), and how many bytes of the content each covers (bits per byte)."""

    ids: list[int] = field(default_factory=list)
    trainable: list[bool] = field(default_factory=list)
    content_bytes: list[int] = field(default_factory=list)


@dataclass
class RenderedConversation:
    head: list[int]
    turns: list[Turn]


def split_into_turns(
    text: str, spans: Spans, ids: Sequence[int], offsets: Sequence[tuple[int, int]]
) -> RenderedConversation:
    """Assign the tokens of a rendered conversation (their ids and character offsets) to its head and turns;
    tokens after the last turn's end (a template's closing newline) are dropped.

    Raises:
        ModelError: a token runs across a turn's end (the end-of-turn token is not a special token).
    """
    head: list[int] = []
    turns = [Turn() for _ in spans.ends]
    turn, covered = 0, 0
    for token, (start, end) in zip(ids, offsets):
        if start < spans.head_end:
            head.append(int(token))
            continue
        while turn < len(turns) and start >= spans.ends[turn]:
            turn += 1
        if turn == len(turns):
            break
        if end > spans.ends[turn]:
            raise ModelError("a token runs across the end of a turn: the end-of-turn token is not a special token")
        content_start, content_end = spans.contents[turn]
        piece = turns[turn]
        piece.ids.append(int(token))
        piece.trainable.append(start >= content_start)
        counted_from = max(start, covered, content_start)
        piece.content_bytes.append(
            len(text[counted_from : min(end, content_end)].encode()) if counted_from < content_end else 0
        )
        covered = max(covered, end)
    return RenderedConversation(head, turns)


def render_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], **template_args: Any
) -> RenderedConversation:
    """One conversation in the tokenizer's chat template, as its head and turns of tokens (see the module docstring);
    data.tokenize_batch does the same for a batch of conversations in one tokenizer call."""
    messages = as_messages(messages)
    text = render_text(tokenizer, messages, **template_args)
    spans = find_spans(text, messages, end_of_turn(tokenizer))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return split_into_turns(text, spans, encoded["input_ids"], encoded["offset_mapping"])
