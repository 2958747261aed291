"""Replies in the emotion and dialogue act you ask for: DailyDialog's per-turn labels as controls the model reads.

    python -m gpt2ft train --condition emotion,act               # labels in each turn's header, never a target
    python -m gpt2ft chat --emotion happiness --act question     # ask for a kind of reply
    python -m gpt2ft eval --control 50                           # how often the replies are what was asked

A conditioned run trains in the model's chat template wrapped by `conditioned_template`: before the template runs,
every message that carries labels gets them as a short tag in front of its text (`[emotion: happiness; act:
question]\nGreat, see you then!`). The tag sits between the template's header and the text the model is scored on,
so it is an input the model reads and never a target (chat_format.find_spans finds the text after it). At the end,
with `add_generation_prompt`, the template writes the tag asked for by its `emotion` and `act` arguments, so plain
transformers can ask for a reply:

    tokenizer.apply_chat_template(messages, add_generation_prompt=True, emotion="happiness", act="question")

A share of the turns (LABEL_DROPOUT, chosen by a hash of the dialogue and the turn, the same on every run) is trained
without its tag, so a reply asked for without a label is as good as a plain run's, and a conversation whose earlier
turns carry no labels (a chat) is what the model has seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from .chat_format import as_messages, template_of
from .conversations import LABELS
from .errors import ConfigError, DataError

CONDITIONS = ("none", "emotion", "act", "emotion,act")
# A fourth of the turns trained without their tag: unconditioned replies keep a plain run's quality (measured in
# bench/RESULTS.md), while three in four turns teach the controls.
LABEL_DROPOUT = 0.25
MARKER = "{#- gpt2ft controls: "
ANY = "any"  # what a selector says for "no label asked for"


def condition_fields(condition: str) -> tuple[str, ...]:
    """`--condition` as the label fields it names: "emotion,act" -> ("emotion", "act"), "none" -> ()."""
    if condition in ("", "none"):
        return ()
    fields = tuple(part.strip() for part in condition.split(","))
    unknown = [field for field in fields if field not in LABELS]
    if unknown:
        raise ConfigError(
            f"--condition {condition}: {', '.join(unknown)} is not a label (choose from {', '.join(LABELS)})"
        )
    return fields


def tag_text(labels: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The tag a turn's labels become: `[emotion: happiness; act: question]` and a newline ("" without labels): a
    newline, not a space, so the text's first token never merges with the tag (a space would join the first word)."""
    parts = [f"{field}: {labels[field]}" for field in fields if labels.get(field)]
    return f"[{'; '.join(parts)}]\n" if parts else ""


def _jinja_tag(source: str, fields: Sequence[str]) -> str:
    """Jinja statements that set `tag.text` to the tag of `source` (a message, or the template's own arguments)."""
    lines = ["{%- set tag = namespace(text='') -%}"]
    for field in fields:
        value = f"{source}['{field}']" if source else field
        present = f"{source}['{field}'] is defined and {value}" if source else f"{field} is defined and {field}"
        lines.append(
            f"{{%- if {present} and {value} != '{ANY}' -%}}"
            f"{{%- set tag.text = tag.text ~ ('; ' if tag.text else '') ~ '{field}: ' ~ {value} -%}}{{%- endif -%}}"
        )
    return "".join(lines)


def conditioned_template(template: str, fields: Sequence[str]) -> str:
    """`template` (the model's, or gpt2ft's) taking labels: each message's labels (its `emotion`/`act` keys) as a
    tag in front of its text, and the labels asked for (the template arguments `emotion`, `act`) after the
    generation prompt. A template already conditioned is unwrapped first, so wrapping twice changes nothing."""
    template = plain_template(template)
    prefix = (
        MARKER
        + ", ".join(fields)
        + " -#}"
        + "{%- set controlled = namespace(messages=[]) -%}"
        + "{%- for message in messages -%}"
        + _jinja_tag("message", fields)
        + "{%- set controlled.messages = controlled.messages + [{'role': message['role'], "
        + "'content': ('[' ~ tag.text ~ ']\\n' if tag.text else '') ~ message['content']}] -%}"
        + "{%- endfor -%}"
        + "{%- set messages = controlled.messages -%}"
    )
    suffix = (
        "{%- if add_generation_prompt -%}"
        + _jinja_tag("", fields)
        + "{{- '[' ~ tag.text ~ ']\\n' if tag.text -}}"
        + "{%- endif -%}"
    )
    return prefix + template + END + suffix


END = "{#- gpt2ft controls end -#}"


def controls_of(template: str | None) -> tuple[str, ...]:
    """The label fields a template takes (those a conditioned run trained with), or () for a plain template."""
    if not template or not template.startswith(MARKER):
        return ()
    return tuple(field.strip() for field in template[len(MARKER) : template.index(" -#}")].split(","))


def controls_for(tokenizer: Any, controls: Mapping[str, str] | None) -> dict[str, str]:
    """The labels of `controls` that the tokenizer's template takes: what one model of several gets when the same
    labels are asked of all (the page's Compare, `compare`), so a plain model beside a conditioned one is asked for
    nothing rather than refused."""
    taken = controls_of(template_of(tokenizer))
    return {field: value for field, value in (controls or {}).items() if field in taken}


def plain_template(template: str) -> str:
    """The template a conditioned one wraps (the template itself when it is not conditioned)."""
    if not controls_of(template):
        return template
    start = template.index("{%- set messages = controlled.messages -%}") + len(
        "{%- set messages = controlled.messages -%}"
    )
    return template[start : template.rindex(END)]


def dropped(key: str, turn: int) -> bool:
    """Whether turn `turn` of the dialogue with `key` is trained without its tag (LABEL_DROPOUT of them)."""
    digest = hashlib.blake2b(f"{key}:{turn}".encode(), digest_size=8).hexdigest()
    return int(digest, 16) / 16**16 < LABEL_DROPOUT


def labelled_messages(
    messages: Sequence[Mapping[str, Any]], fields: Sequence[str], key: str | None = None
) -> list[dict[str, Any]]:
    """A record's messages with the labels of `fields` kept (and, with a dialogue `key`, dropped from the turns
    `dropped` picks: training rows), the other labels removed; roles as chat_format.as_messages gives them."""
    rendered = as_messages(messages)
    for index, (message, original) in enumerate(zip(rendered, messages)):
        if key is not None and dropped(key, index):
            continue
        for field in fields:
            value = original.get(field) if isinstance(original, Mapping) else None
            if value:
                message[field] = value
    return rendered


def check_labelled(dialogs: Any, fields: Sequence[str], source: str) -> None:
    """A conditioned run needs the labels it conditions on.

    Raises:
        DataError: no turn of the data carries one of `fields`.
    """
    for field in fields:
        if not any(message.get(field) for messages in dialogs["messages"][:200] for message in messages):
            choices = ", ".join(LABELS[field])
            raise DataError(
                f"{source}: --condition {','.join(fields)}: the conversations carry no {field!r} labels (DailyDialog "
                f'has them; your own messages can, as "{field}" beside "role" and "content": {choices})'
            )


def asked(emotion: str | None = None, act: str | None = None) -> dict[str, str]:
    """The template arguments of a request for a reply (`--emotion`, `--act`, the page's selectors): only the labels
    given and not "any".

    Raises:
        ConfigError: a label outside the label set, naming the flag.
    """
    chosen = {}
    for field, value in (("emotion", emotion), ("act", act)):
        if value is None or value == ANY:
            continue
        if value not in LABELS[field]:
            raise ConfigError(f"--{field} {value}: not a DailyDialog {field} (choose from {', '.join(LABELS[field])})")
        chosen[field] = value
    return chosen
