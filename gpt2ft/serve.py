"""A web page to talk to a fine-tuned model and to judge it blind against another one (Gradio).

    python -m gpt2ft serve --model gpt2_finetuned                     # http://127.0.0.1:7860
    python -m gpt2ft serve --model gpt2_finetuned --share --auth me:secret   # a public link, with a password
    python -m gpt2ft votes --db logs/votes.sqlite                     # the blind votes, counted

Three tabs:
- **Chat**: replies streamed token by token from `generate.generate_reply` (the model's chat template, its saved
  decoding settings as defaults, the context cut to the most recent whole turns that fit).
- **Compare**: the same conversation goes to both models; the replies are shown as "Reply A" and "Reply B" in a
  random order that only the server knows (it lives in server-side session state) until the vote is cast. Votes
  go to SQLite (`gpt2ft.votes`).
- **Results**: wins, losses, ties and win rate per pair of models, with a 95% Wilson interval; each model by a
  short name (a folder's name), its full name on hover.

The side panel's decoding settings are shared by Chat and Compare; for a model trained with `--condition` it also has
Emotion and Act selectors (controls.py), and each model is asked for the labels its own template takes.

Generation runs in worker threads with a time limit; Gradio's queue runs at most `concurrency` generations at once
and queues the rest, while the page's other events (votes, resets) are never held behind them. The notebook calls
`serve_in_notebook`, which shows the same page inline (with a public share link on Colab).
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import random
import re
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .chat_format import template_of
from .colab import in_colab
from .config import DEFAULT_CONCURRENCY, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIME_LIMIT_S, recorded_start
from .controls import ANY, controls_for, controls_of
from .conversations import LABELS
from .errors import Gpt2ftError
from .generate import generate_reply, load_for_generation
from .modeling import ModelError, model_context
from .votes import (
    DEFAULT_VOTES_DB,
    VoteAlreadyCounted,
    VotesError,
    init_votes_db,
    read_votes,
    record_vote,
    tally_votes,
)

# gradio is imported inside the functions that build and launch the page: importing it takes seconds, which the
# tests of the page's logic (and the notebook, until it serves) need not pay.

# The page must not phone home: no usage analytics, no version check (it may run offline, and on a shared link
# nobody agreed to it). Set before gradio is imported; a value the user set is kept.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

LOGGER = logging.getLogger(__name__)

# GPT-2 reads at most 1,024 tokens (~4,000 characters of English), so a longer message is kept by its end: the
# model would only see the end anyway, and the page stays light (a 200,000-character message would otherwise be
# sent back and forth with every update).
MAX_MESSAGE_CHARS = 8_000
EXAMPLE_OPENINGS = (
    "Hi! How was your weekend?",
    "Excuse me, could you tell me the way to the train station?",
    "I'm looking for a birthday present for my sister. Any ideas?",
    "What would you like to have for dinner tonight?",
)
# The page has no upload component: Gradio's upload route (kept, as its file routes are) accepts no file with content,
# so nobody can store files on the server and have the page's address serve them back.
MAX_UPLOAD_BYTES = 0
WINNER_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
EMPTY_REPLY = "(no reply: the model ended its turn at once)"
# What the Emotion and Act selectors say for "no label asked for" (controls.ANY, the template's own word for it).
NO_LABEL = ANY
RESULT_HEADERS = ["model", "opponent", "votes", "wins", "losses", "ties", "both bad", "win rate", "95% interval"]
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

CSS = """
.gradio-container { max-width: 1180px !important; margin: 0 auto !important; }
#title h1 { margin-bottom: 0.1em; }
#model-line { color: var(--body-text-color-subdued); }
.reply-box textarea { font-size: 1.02em; }
#reveal { min-height: 1.5em; }
"""


class ServeError(Gpt2ftError, ValueError):
    """The page cannot start (port in use, bad --auth, ...); the message names the flag."""


# --------------------------------------------------------------------------------------------------------------
# Models and what the page says about them
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A loaded model with the names the page and the votes use.

    name: the model as given (`--model`/`--compare-with`: a folder or Hub id), stored with each vote.
    title: the short name shown on the page (the folder's name).
    info: base model and perplexities read from the folder (describe_model).
    """

    name: str
    model: Any
    tokenizer: Any
    title: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def display_name(name: str) -> str:
    """A model's short name: a folder's last part (`runs/gpt2_finetuned/` -> `gpt2_finetuned`), a Hub id as is."""
    path = Path(name).expanduser()
    return path.name if path.is_dir() and path.name else name


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def describe_model(name: str) -> dict[str, Any]:
    """Base model and validation/test perplexity of a saved model, for the page's header.

    From the folder's `training_config.json` ({"config": {"model": base, "logs_dir": ...}, "metrics": {...}}),
    else from the run's `metrics.json` in its logs folder; a Hub id or a folder without them gives None values. A
    preference-tuned folder (`prefer`) also records its stage, algorithm and the model it started from:
    {"stage": "prefer", "algorithm", "started_from"}, added to the description.
    """
    saved = read_json(Path(name).expanduser() / "training_config.json")
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    metrics = saved.get("metrics") if isinstance(saved.get("metrics"), dict) else {}
    if not metrics and config.get("logs_dir"):
        metrics = read_json(Path(str(config["logs_dir"])) / "metrics.json")
    info: dict[str, Any] = {"base_model": config.get("model")}
    for key in ("eval_perplexity", "test_perplexity"):
        value = metrics.get(key)
        info[key] = float(value) if isinstance(value, (int, float)) else None
    if saved.get("stage") == "prefer":
        info.update(stage="prefer", algorithm=saved.get("algorithm"), started_from=saved.get("started_from"))
    return info


def default_opponent(model_dir: str) -> str | None:
    """The model to compare with by default: for a preference-tuned folder the model it started from (so the next
    round of votes says whether preference tuning helped), otherwise the base model recorded in a fine-tuned
    folder's training_config.json (e.g. `gpt2`); None when neither is recorded."""
    return recorded_start(model_dir)


def load_served_model(name: str, model: Any = None, tokenizer: Any = None) -> ServedModel:
    """Load a model for the page (safetensors only, via generate.load_for_generation), or wrap one already loaded.

    Raises:
        ModelError: the folder is missing, unreadable or not a GPT-2 model.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_for_generation(name)
    return ServedModel(name=name, model=model, tokenizer=tokenizer, title=display_name(name), info=describe_model(name))


def format_model_line(served: ServedModel) -> str:
    """One markdown line: base model and perplexities (or that there are none)."""
    info = served.info
    parts = []
    if info.get("started_from"):
        algorithm = str(info.get("algorithm") or "").upper()
        parts.append(
            f"preference-tuned{f' ({algorithm})' if algorithm else ''} from `{display_name(str(info['started_from']))}`"
        )
    elif info.get("base_model"):
        parts.append(f"fine-tuned from `{display_name(str(info['base_model']))}`")
    for key, label in (("eval_perplexity", "validation perplexity"), ("test_perplexity", "test perplexity")):
        if info.get(key) is not None:
            parts.append(f"{label} **{info[key]:.2f}**")
    if not any(info.get(key) is not None for key in ("eval_perplexity", "test_perplexity")):
        parts.append("no perplexity recorded (no `training_config.json` or `metrics.json` metrics)")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Decoding settings and input
# --------------------------------------------------------------------------------------------------------------


def saved_decoding(model: Any) -> dict[str, Any]:
    """The model's saved decoding settings (generation_config.json), as the page's controls and fixed extras.

    gpt2ft saves sampling at temperature 0.8, top-p 0.9, top-k 0, 50 new tokens (its replies add a repetition guard
    on the reply itself, generate.ReplyNoRepeatNGram); a model saved elsewhere (the base `gpt2`) may say greedy, and
    the page then starts greedy too.
    """
    config = model.generation_config
    return {
        "greedy": not bool(getattr(config, "do_sample", False)),
        "temperature": float(getattr(config, "temperature", None) or 1.0),
        "top_p": float(getattr(config, "top_p", None) or 1.0),
        "max_new_tokens": int(getattr(config, "max_new_tokens", None) or 50),
        "top_k": getattr(config, "top_k", None),
        "no_repeat_ngram_size": getattr(config, "no_repeat_ngram_size", None),
        "repetition_penalty": getattr(config, "repetition_penalty", None),
    }


def max_tokens_limit(served: Sequence[ServedModel]) -> int:
    """The most new tokens the page offers: half the smallest context, at most 512."""
    return max(1, min(512, min(model_context(item.model) for item in served) // 2))


def clamp(value: Any, low: float, high: float, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    if number != number:  # NaN
        return default
    return min(high, max(low, number))


def decoding_settings(
    defaults: Mapping[str, Any], temperature: Any, top_p: Any, max_new_tokens: Any, greedy: Any, token_limit: int
) -> dict[str, Any]:
    """The settings one generation uses: the page's controls (clamped to their ranges, since the HTTP API can send
    anything) over the served model's saved extras (top_k, no_repeat_ngram_size, repetition_penalty).

    Both models of a comparison get the same settings, so the vote compares models, not decoding.
    """
    settings = {
        "greedy": bool(greedy),
        "temperature": round(clamp(temperature, 0.05, 2.0, defaults["temperature"]), 3),
        "top_p": round(clamp(top_p, 0.05, 1.0, defaults["top_p"]), 3),
        "max_new_tokens": int(clamp(max_new_tokens, 1, token_limit, min(defaults["max_new_tokens"], token_limit))),
    }
    for key in ("top_k", "no_repeat_ngram_size", "repetition_penalty"):
        if defaults.get(key) is not None:
            settings[key] = defaults[key]
    return settings


def served_controls(models: Sequence[ServedModel]) -> tuple[str, ...]:
    """The label fields at least one of the models reads (controls.controls_of its template), in LABELS' order:
    the selectors the page shows."""
    taken = {name for item in models for name in controls_of(template_of(item.tokenizer))}
    return tuple(name for name in LABELS if name in taken)


def asked_controls(chosen: Mapping[str, Any], offered: Sequence[str]) -> dict[str, str]:
    """The labels the Emotion and Act selectors ask for ({"emotion": "happiness"}; controls.asked's form): NO_LABEL
    (or "any", None, "") asks for nothing.

    The HTTP API can send anything, so a value is checked here too (Gradio's own check of the choices does not see
    a selector that is hidden because no model reads its field): a label is refused, not ignored, so nobody votes on
    replies believing they were asked for an emotion the models never saw.

    Raises:
        ServeError: a label outside DailyDialog's set, or of a field no model on the page reads (`offered`).
    """
    controls = {}
    for name, value in chosen.items():
        if value is None or value in ("", NO_LABEL, ANY):
            continue
        value = str(value)
        if value not in LABELS[name]:
            raise ServeError(
                f"{name.capitalize()} {value!r} is not a DailyDialog {name} (choose from {', '.join(LABELS[name])})"
            )
        if name not in offered:
            raise ServeError(
                f"{name.capitalize()} {value!r}: no model on this page was trained with {name} controls "
                f"(train one with --condition {name})"
            )
        controls[name] = value
    return controls


def generation_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """decoding_settings as generate_reply's keyword arguments (do_sample is set either way: a base model's
    saved config may be greedy, and the page's choice must win). The labels asked for (`controls`) are left out:
    stream_replies gives each model those it reads."""
    kwargs = {key: value for key, value in settings.items() if key not in ("greedy", "controls")}
    greedy = bool(settings.get("greedy"))
    kwargs["do_sample"] = not greedy
    return {"greedy": greedy, **kwargs}


def clean_message(
    text: Any, special_tokens: Sequence[str] = (), max_chars: int = MAX_MESSAGE_CHARS
) -> tuple[str, str | None]:
    """A typed message made safe for the model: text that cannot be encoded (lone surrogates from a broken client)
    replaced, control characters and the tokenizer's special tokens (a typed `<|endoftext|>` would end the turn
    early) removed, and at most `max_chars` characters, keeping the end.

    Returns:
        (the cleaned message, a notice for the user or None); an empty message means there is nothing to send.
    """
    text = "" if text is None else str(text)
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = CONTROL_CHARACTERS.sub("", text)
    for token in special_tokens:
        if token:
            text = text.replace(token, " ")
    text = text.strip()
    notice = None
    if len(text) > max_chars:
        notice = (
            f"Your message has {len(text):,} characters; the model reads at most about 1,000 tokens, so only its last "
            f"{max_chars:,} characters were sent."
        )
        text = "…" + text[-max_chars:].lstrip()
    return text, notice


def display_messages(history: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The conversation as the Chatbot shows it: an empty reply gets a visible note instead of an empty bubble."""
    shown = []
    for message in history:
        empty_reply = message["role"] == "assistant" and not message["content"]
        shown.append({"role": message["role"], "content": EMPTY_REPLY if empty_reply else message["content"]})
    return shown


# --------------------------------------------------------------------------------------------------------------
# Streaming generation
# --------------------------------------------------------------------------------------------------------------


class GenerationTimeout(RuntimeError):
    """No token and no end arrived within the time limit."""


class QueueStreamer(BaseStreamer):
    """TextIteratorStreamer's idea, token by token and for several replies at once: each new token's text goes to
    one shared queue (`events`), tagged with its reply (`key`), as (key, "text", new text).

    transformers' TextStreamer waits for a space before showing a word; here a token shows as soon as the reply
    decoded so far only grows (no half-written UTF-8 character at its end, no earlier text changed by it). The
    finished reply replaces the streamed text anyway, so whatever is held back is never lost.
    """

    def __init__(self, tokenizer: Any, key: str, events: queue.Queue) -> None:
        self.tokenizer, self.key, self.events = tokenizer, key, events
        self.tokens: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.tokens.extend(int(token) for token in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.shown) and text.startswith(self.shown) and not text.endswith("\ufffd"):
            self.events.put((self.key, "text", text[len(self.shown) :]))
            self.shown = text

    def end(self) -> None:
        pass


class StopWhenAsked(StoppingCriteria):
    """Stops generate() at its next token once `stop` is set (the consumer of the replies has left)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.stop.is_set()


def stream_replies(
    models: Mapping[str, ServedModel],
    history: Sequence[Mapping[str, str]],
    settings: Mapping[str, Any],
    time_limit: float,
    grace_s: float = 30.0,
) -> Iterator[dict[str, str]]:
    """Generate every model's reply to `history` at once, each in its own thread; yield {key: text so far} as
    tokens arrive, and last the finished replies (generate_reply's text: stopped at EOS, stripped).

    The labels asked for (`settings["controls"]`, asked_controls) go to each model as far as its own template takes
    them (controls.controls_for): a plain model beside a conditioned one is asked for nothing.

    The time limit is passed to generate (`max_time`: the reply is cut there); when no token arrives for
    `time_limit + grace_s` seconds (a generation stuck before its first token), GenerationTimeout is raised.
    Leaving the iterator early (a cancelled request: the user pressed "New conversation" or closed the page) stops
    the threads at their next token.

    Raises:
        GenerationTimeout, or the first error a generation raised.
    """
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    kwargs = generation_kwargs(settings)
    asked = settings.get("controls") or {}

    def work(key: str, served: ServedModel) -> None:
        try:
            reply = generate_reply(
                served.model,
                served.tokenizer,
                list(history),
                controls=controls_for(served.tokenizer, asked) or None,
                streamer=QueueStreamer(served.tokenizer, key, events),
                stopping_criteria=StoppingCriteriaList([StopWhenAsked(stop)]),
                max_time=float(time_limit),
                **kwargs,
            )
            events.put((key, "done", reply.text))
        except BaseException as error:  # reported to the page by the consumer, never lost in the thread
            events.put((key, "error", error))

    texts = {key: "" for key in models}
    pending = set(models)
    for key, served in models.items():
        threading.Thread(target=work, args=(key, served), name=f"gpt2ft-generate-{key}", daemon=True).start()
    try:
        while pending:
            try:
                key, kind, value = events.get(timeout=float(time_limit) + grace_s)
            except queue.Empty:
                raise GenerationTimeout(f"no reply within the {time_limit:.0f} s time limit") from None
            if kind == "error":
                raise value
            if kind == "done":
                pending.discard(key)
                texts[key] = value
            else:
                texts[key] += value
            yield dict(texts)
    finally:
        stop.set()


def describe_error(error: BaseException) -> str:
    """One line for the page: what went wrong, never a stack trace."""
    if isinstance(error, GenerationTimeout):
        return f"The model took too long: {error}."
    text = str(error).strip().splitlines()
    return f"The model could not reply ({type(error).__name__}: {text[0] if text else 'no details'})."


# --------------------------------------------------------------------------------------------------------------
# The votes, as the page shows them
# --------------------------------------------------------------------------------------------------------------


RESULT_TYPES = ["html", "html", "number", "number", "number", "number", "number", "str", "str"]
# Fixed shares of the table's width, each wide enough for its header on one line (or two whole words): columns
# sized by their content squeeze the short headers to a letter or two a line ("vo / te / s") beside a long name.
RESULT_WIDTHS = ["18%", "18%", "9%", "8%", "10%", "8%", "8%", "8%", "13%"]


def looks_like_path(name: str) -> bool:
    """A model name that is a folder (an absolute or ./ path, or one that exists here) rather than a Hub id."""
    return name.startswith(("/", ".", "~")) or (os.sep in name and Path(name).expanduser().is_dir())


def short_names(names: Sequence[str], titles: Mapping[str, str]) -> dict[str, str]:
    """The name the Results table shows for each model: the page's own title for a model it serves, a folder's last
    part for a folder (`/content/drive/MyDrive/runs/gpt2_finetuned` -> `gpt2_finetuned`), a Hub id as it is. A
    model that would read the same as another (an older run's folder of the same name) gets as many of its last
    path parts as tell it apart; the served models keep the names the rest of the page uses."""
    names = list(dict.fromkeys(names))
    shown = {name: titles.get(name) or (Path(name).name if looks_like_path(name) else name) or name for name in names}
    for name in names:
        if name in titles or sum(shown[other] == shown[name] for other in names) < 2:
            continue
        parts = Path(name).parts
        taken = {shown[other] for other in names if other != name}
        shown[name] = next(
            (suffix for count in range(2, len(parts)) if (suffix := "/".join(parts[-count:])) not in taken), name
        )
    return shown


def name_cell(name: str, shown: Mapping[str, str]) -> str:
    """A model's cell: its short name, the full name on hover (both escaped: names come from the votes file). A
    name too long for its column breaks after a `/`, not inside a folder's name."""
    short = "/<wbr>".join(html.escape(part) for part in shown[name].split("/"))
    return f'<span title="{html.escape(name)}">{short}</span>'


def results_rows(votes_db: str | Path, titles: Mapping[str, str]) -> list[list[Any]]:
    """The Results table: one row per pair, win rate and its interval as percentages.

    Models are shown by short names (short_names), which keeps the columns narrow enough for their headers; the
    full name (a folder's path) shows on hover.
    """
    try:
        pairs = tally_votes(read_votes(votes_db))
    except ValueError:
        return []
    shown = short_names([name for pair in pairs for name in (pair["model"], pair["opponent"])], titles)
    return [
        [
            name_cell(pair["model"], shown),
            name_cell(pair["opponent"], shown),
            pair["votes"],
            pair["wins"],
            pair["losses"],
            pair["ties"],
            pair["both_bad"],
            f"{pair['win_rate']:.0%}",
            f"{pair['ci95_low']:.0%} – {pair['ci95_high']:.0%}",
        ]
        for pair in pairs
    ]


def reveal_text(
    round_: Mapping[str, Any],
    winner: str,
    titles: Mapping[str, str],
    served_name: str,
    tally: Sequence[Mapping[str, Any]],
) -> str:
    """What the page says after a vote: which model wrote which reply, and the pair's running score."""
    model_a, model_b = round_["models"]["a"], round_["models"]["b"]

    def label(name: str) -> str:
        return f"**{titles.get(name, name)}**" + (" (yours)" if name == served_name else "")

    lines = [
        f"You voted **{WINNER_LABELS[winner]}**. Reply A was written by {label(model_a)}, Reply B by {label(model_b)}."
    ]
    for pair in tally:
        if {pair["model"], pair["opponent"]} == {model_a, model_b}:
            lines.append(
                f"So far {titles.get(pair['model'], pair['model'])} wins {pair['win_rate']:.0%} of {pair['votes']} "
                f"vote{'s' if pair['votes'] != 1 else ''} against {titles.get(pair['opponent'], pair['opponent'])} "
                f"(95% interval {pair['ci95_low']:.0%}–{pair['ci95_high']:.0%})."
            )
    lines.append("Continue the conversation from either reply, or start over.")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The page: what its parts share
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PageSetup:
    """What every part of the page shares: the models and the names shown for them, the decoding defaults and
    limits, the label fields some model reads (`controls`: the selectors shown), and where the votes go."""

    served: ServedModel
    opponent: ServedModel | None
    models: dict[str, ServedModel]  # "model" (the served one) and, when comparing, "opponent"
    titles: dict[str, str]  # model name -> the name the page shows
    defaults: dict[str, Any]  # the served model's saved decoding settings
    token_limit: int
    specials: list[str]
    votes_db: str | Path
    time_limit: float
    rng: random.Random
    controls: tuple[str, ...] = ()  # label fields ("emotion", "act") at least one served model reads

    def settings_from(
        self, temperature: Any, top_p: Any, max_new_tokens: Any, greedy: Any, emotion: Any = None, act: Any = None
    ) -> dict[str, Any]:
        """The side panel's values, checked: the four decoding controls clamped (the HTTP API may send anything),
        and the labels asked for under `controls` ({} for none; asked_controls).

        Raises:
            ServeError: a label that is not DailyDialog's, or of a field no served model reads.
        """
        settings = decoding_settings(self.defaults, temperature, top_p, max_new_tokens, greedy, self.token_limit)
        settings["controls"] = asked_controls({"emotion": emotion, "act": act}, self.controls)
        return settings

    def readers(self, label_field: str) -> list[str]:
        """The titles of the served models that read `label_field` ("emotion" or "act")."""
        unique = {id(item): item for item in self.models.values()}.values()
        return [self.titles[item.name] for item in unique if label_field in controls_of(template_of(item.tokenizer))]


def setup_page(
    served: ServedModel,
    opponent: ServedModel | None,
    votes_db: str | Path,
    time_limit: float,
    rng: random.Random | None,
) -> PageSetup:
    """The page's shared set-up (see build_app for the arguments; `rng=None` = the operating system's randomness)."""
    models = {"model": served, "opponent": opponent} if opponent is not None else {"model": served}
    titles = {item.name: item.title for item in models.values()}
    if opponent is not None and opponent.title == served.title and opponent.name != served.name:
        titles[opponent.name] = opponent.name  # two folders with the same last part: show the paths
    return PageSetup(
        served=served,
        opponent=opponent,
        models=models,
        titles=titles,
        defaults=saved_decoding(served.model),
        token_limit=max_tokens_limit(list(models.values())),
        specials=sorted({token for item in models.values() for token in item.tokenizer.all_special_tokens}),
        votes_db=votes_db,
        time_limit=time_limit,
        rng=rng or random.SystemRandom(),
        controls=served_controls(list(models.values())),
    )


def build_decoding_panel(page: PageSetup) -> list[Any]:
    """The side panel: the decoding controls, shared by Chat and Compare, the Emotion and Act selectors (shown for
    a field some served model reads: `train --condition`), and a note on when replies stop.

    Returns:
        The controls in the order the handlers take them: temperature, top-p, max new tokens, greedy, emotion, act.
    """
    import gradio as gr

    defaults, token_limit = page.defaults, page.token_limit
    with gr.Column(variant="panel"):
        gr.Markdown(
            f"### Decoding settings\nDefaults from `{page.served.title}`'s saved generation config. Compare "
            "gives both models the same settings"
            + (" (and the labels, to each model those it reads)." if page.controls else ".")
        )
        greedy = gr.Checkbox(value=defaults["greedy"], label="Greedy (always the likeliest token)", elem_id="greedy")
        temperature = gr.Slider(
            0.05,
            2.0,
            value=defaults["temperature"],
            step=0.05,
            label="Temperature",
            info="Higher: more varied, less focused.",
        )
        top_p = gr.Slider(
            0.05,
            1.0,
            value=defaults["top_p"],
            step=0.05,
            label="Top-p",
            info="Sample from the likeliest tokens covering this share of probability.",
        )
        max_new = gr.Slider(
            1,
            token_limit,
            value=min(defaults["max_new_tokens"], token_limit),
            step=1,
            label="Max new tokens",
        )
        selectors = []
        for name, label in (("emotion", "Emotion"), ("act", "Act")):
            readers = page.readers(name)
            selectors.append(
                gr.Dropdown(
                    choices=[NO_LABEL, *LABELS[name]],
                    value=NO_LABEL,
                    label=label,
                    info=f"The {name} of the reply; read by {', '.join(readers)} (trained with --condition)."
                    if readers
                    else None,
                    visible=name in page.controls,
                    elem_id=f"{name}-select",
                    interactive=True,
                )
            )
    gr.Markdown(
        f"Replies stop at the model's end-of-turn token, at the token limit, or after {page.time_limit:.0f} s. "
        "Long conversations keep only their most recent turns that fit the model's context.",
        elem_id="notes",
    )
    return [temperature, top_p, max_new, greedy, *selectors]


# --------------------------------------------------------------------------------------------------------------
# The page: Chat
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ChatTab:
    """The Chat tab's components that its events read or change."""

    chatbot: Any
    box: Any
    send: Any
    new: Any
    history: Any


def build_chat_tab(page: PageSetup) -> ChatTab:
    """The Chat tab: the conversation, the message box with Send, New conversation, and example openings."""
    import gradio as gr

    with gr.Tab("Chat", id="chat"):
        chatbot = gr.Chatbot(
            label=f"Conversation with {page.served.title}",
            height=430,
            elem_id="chat-bot",
            placeholder="Type a message below, or pick an example opening.",
            feedback_options=None,
            buttons=["copy", "copy_all"],
        )
        with gr.Row(equal_height=True):
            box = gr.Textbox(
                placeholder="Your message (Enter sends)",
                show_label=False,
                scale=5,
                autofocus=True,
                elem_id="chat-input",
                max_lines=6,
            )
            send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="chat-send")
        new = gr.Button("New conversation", size="sm", elem_id="chat-new")
        gr.Examples(examples=[[opening] for opening in EXAMPLE_OPENINGS], inputs=[box], label="Example openings")
        history = gr.State([])
    return ChatTab(chatbot=chatbot, box=box, send=send, new=new, history=history)


def checked_settings(page: PageSetup, *values: Any) -> dict[str, Any]:
    """page.settings_from(*values), a refused label as the page's error message (the message stays in its box)."""
    import gradio as gr

    try:
        return page.settings_from(*values)
    except ServeError as error:
        raise gr.Error(str(error), print_exception=False) from None


def make_chat_handlers(page: PageSetup) -> tuple[Callable[..., Iterator[tuple]], Callable[[], tuple]]:
    """Chat's two handlers: send a message (a generator that streams the reply), and start a new conversation.

    Both return the outputs conversation (shown), history, message box, Send button. The box is cleared once, when
    the message is taken (what the user types during the reply is left alone); Send is off until the reply is
    complete.
    """
    import gradio as gr

    def chat_send(
        message: str,
        history: list,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        greedy: bool,
        emotion: str = NO_LABEL,
        act: str = NO_LABEL,
    ):
        history = list(history or [])
        settings = checked_settings(page, temperature, top_p, max_new_tokens, greedy, emotion, act)
        text, notice = clean_message(message, page.specials)
        if not text:
            gr.Warning("Type a message first.")
            yield display_messages(history), history, gr.skip(), gr.skip()
            return
        if notice:
            gr.Warning(notice)
        conversation = history + [{"role": "user", "content": text}]
        thinking = [{"role": "assistant", "content": "…"}]
        yield display_messages(conversation) + thinking, history, "", gr.Button(interactive=False)
        reply = ""
        try:
            for texts in stream_replies({"model": page.served}, conversation, settings, page.time_limit):
                reply = texts["model"]
                partial = [{"role": "assistant", "content": reply or "…"}]
                yield display_messages(conversation) + partial, gr.skip(), gr.skip(), gr.skip()
        except Exception as error:
            LOGGER.exception("chat generation failed")
            # The message comes back into the box, to send again.
            yield display_messages(history), history, message, gr.Button(interactive=True)
            raise gr.Error(describe_error(error), print_exception=False) from None
        history = conversation + [{"role": "assistant", "content": reply}]
        yield display_messages(history), history, gr.skip(), gr.Button(interactive=True)

    def chat_reset():
        return [], [], "", gr.Button(interactive=True)

    return chat_send, chat_reset


def wire_chat_tab(page: PageSetup, tab: ChatTab, decoding: list[Any], generation: dict, instant: dict) -> None:
    """Chat's events: Send or Enter streams a reply; New conversation and the Chatbot's trash button start over.

    Args:
        generation, instant: the queue settings of generating events and of millisecond ones (see build_app).
    """
    import gradio as gr

    chat_send, chat_reset = make_chat_handlers(page)
    chat_out = [tab.chatbot, tab.history, tab.box, tab.send]
    chat_event = gr.on(
        [tab.send.click, tab.box.submit],
        chat_send,
        [tab.box, tab.history, *decoding],
        chat_out,
        api_name="chat",
        show_progress="hidden",
        **generation,
    )
    tab.new.click(chat_reset, None, chat_out, cancels=[chat_event], api_name="chat_reset", **instant)
    # The Chatbot's own trash button must clear the conversation the model sees, not only what is shown.
    tab.chatbot.clear(chat_reset, None, chat_out, cancels=[chat_event], api_visibility="private", **instant)


# --------------------------------------------------------------------------------------------------------------
# The page: Compare (blind)
# --------------------------------------------------------------------------------------------------------------

# Every Compare handler returns the same outputs, in the order of CompareTab.outputs(): conversation (shown),
# history, round, Reply A, Reply B, the reveal line, the four vote buttons, the continue row, message box, send.
COMPARE_OUTPUTS = 13


@dataclass
class CompareTab:
    """The Compare tab's components that its events read or change."""

    chatbot: Any
    box: Any
    send: Any
    reply_a: Any
    reply_b: Any
    vote_buttons: dict[str, Any]  # WINNER_LABELS key -> its button
    reveal: Any
    continue_row: Any
    continue_a: Any
    continue_b: Any
    new: Any
    history: Any
    round_state: Any  # the current round, server-side: the replies and which model wrote which

    def outputs(self) -> list[Any]:
        """What every Compare handler returns, in this order (COMPARE_OUTPUTS of them)."""
        return [
            self.chatbot,
            self.history,
            self.round_state,
            self.reply_a,
            self.reply_b,
            self.reveal,
            *self.vote_buttons.values(),
            self.continue_row,
            self.box,
            self.send,
        ]


def build_compare_tab(page: PageSetup) -> CompareTab:
    """The Compare (blind) tab: the conversation, the message box, Reply A and B, the votes and how to go on."""
    import gradio as gr

    with gr.Tab("Compare (blind)", id="compare"):
        if page.opponent is None:
            gr.Markdown(
                "No model to compare with: the model folder records no base model. Start the page "
                "with `--compare-with MODEL` (a folder or a Hub id such as `gpt2`)."
            )
        else:
            gr.Markdown(
                f"Your message goes to **{page.titles[page.served.name]}** and "
                f"**{page.titles[page.opponent.name]}**. Their replies appear as **Reply A** and **Reply B**, in a "
                "random order. Vote for the better one; the page then tells you which model wrote which."
            )
        chatbot = gr.Chatbot(
            label="Conversation so far",
            height=250,
            elem_id="compare-bot",
            feedback_options=None,
            placeholder="Both models will answer your message.",
            buttons=["copy", "copy_all"],
        )
        with gr.Row(equal_height=True):
            box = gr.Textbox(
                placeholder="Your message (Enter sends)",
                show_label=False,
                scale=5,
                elem_id="compare-input",
                max_lines=6,
                interactive=page.opponent is not None,
            )
            send = gr.Button(
                "Send to both",
                variant="primary",
                scale=1,
                min_width=110,
                elem_id="compare-send",
                interactive=page.opponent is not None,
            )
        with gr.Row(equal_height=True):
            reply_a, reply_b = (
                gr.Textbox(
                    label=f"Reply {side}",
                    lines=4,
                    max_lines=12,
                    interactive=False,
                    elem_id=f"reply-{side.lower()}",
                    elem_classes="reply-box",
                )
                for side in "AB"
            )
        with gr.Row():
            vote_buttons = {
                winner: gr.Button(
                    label,
                    interactive=False,
                    elem_id=f"vote-{winner.replace('_', '-')}",
                    variant="primary" if winner in ("a", "b") else "secondary",
                )
                for winner, label in WINNER_LABELS.items()
            }
        reveal = gr.Markdown("", elem_id="reveal")
        with gr.Row(visible=False) as continue_row:
            continue_a = gr.Button("Continue with Reply A", elem_id="continue-a")
            continue_b = gr.Button("Continue with Reply B", elem_id="continue-b")
        new = gr.Button("Start over", size="sm", elem_id="compare-new")
        history = gr.State([])
        round_ = gr.State(None)
    return CompareTab(
        chatbot=chatbot,
        box=box,
        send=send,
        reply_a=reply_a,
        reply_b=reply_b,
        vote_buttons=vote_buttons,
        reveal=reveal,
        continue_row=continue_row,
        continue_a=continue_a,
        continue_b=continue_b,
        new=new,
        history=history,
        round_state=round_,
    )


def compare_outputs(chatbot_value, history_value, round_value, text_a, text_b, reveal_value, controls) -> list[Any]:
    """One Compare handler's return value, in the order of CompareTab.outputs()."""
    return [chatbot_value, history_value, round_value, text_a, text_b, reveal_value, *controls]


def compare_controls(voting: bool, voted: bool, typing: bool, clear_box: bool = False) -> list[Any]:
    """Vote buttons, the continue row, the message box and its button, for the moments of a round: typing,
    waiting for the replies, voting, and choosing how to go on."""
    import gradio as gr

    box = gr.Textbox(value="", interactive=typing) if clear_box else gr.Textbox(interactive=typing)
    votes = [gr.Button(interactive=voting) for _ in WINNER_LABELS]
    return [*votes, gr.Row(visible=voted), box, gr.Button(interactive=typing)]


def reply_boxes(page: PageSetup, text_a: str, text_b: str, names: Mapping[str, str] | None = None) -> list[Any]:
    """The two reply boxes with their labels: "Reply A"/"Reply B", and after the vote the models' names."""
    import gradio as gr

    def label(side: str) -> str:
        if not names:
            return f"Reply {side.upper()}"
        name = names[side]
        yours = " (yours)" if name == page.served.name else ""
        return f"Reply {side.upper()} · {page.titles.get(name, name)}{yours}"

    return [gr.Textbox(value=text_a, label=label("a")), gr.Textbox(value=text_b, label=label("b"))]


def make_compare_send(page: PageSetup) -> Callable[..., Iterator[list[Any]]]:
    """Compare's Send: both models answer the same conversation, streamed as Reply A and B in a random order."""
    import gradio as gr

    def compare_send(
        message: str,
        history: list,
        round_: dict | None,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        greedy: bool,
        emotion: str = NO_LABEL,
        act: str = NO_LABEL,
    ):
        history = list(history or [])
        if page.opponent is None:
            gr.Warning("Start the page with --compare-with MODEL to compare two models.")
            yield [gr.skip()] * COMPARE_OUTPUTS
            return
        if round_ and not round_.get("voted"):
            gr.Warning("Vote on the two replies first (or press Start over).")
            yield [gr.skip()] * COMPARE_OUTPUTS
            return
        text, notice = clean_message(message, page.specials)
        if not text:
            gr.Warning("Type a message first.")
            yield [gr.skip()] * COMPARE_OUTPUTS
            return
        if notice:
            gr.Warning(notice)
        conversation = history + [{"role": "user", "content": text}]
        settings = checked_settings(page, temperature, top_p, max_new_tokens, greedy, emotion, act)
        # The shuffle: which model is "A" is decided here and kept in server-side state until the vote.
        order = ["model", "opponent"] if page.rng.random() < 0.5 else ["opponent", "model"]
        shown = {"a": page.models[order[0]], "b": page.models[order[1]]}
        busy = compare_controls(voting=False, voted=False, typing=False, clear_box=True)
        yield compare_outputs(display_messages(conversation), history, None, *reply_boxes(page, "…", "…"), "", busy)
        texts = {"a": "", "b": ""}
        try:
            for texts in stream_replies(shown, conversation, settings, page.time_limit):
                streamed = [texts["a"] or "…", texts["b"] or "…"]
                yield compare_outputs(*[gr.skip()] * 3, *streamed, gr.skip(), [gr.skip()] * 7)
        except Exception as error:
            LOGGER.exception("compare generation failed")
            idle = compare_controls(voting=False, voted=False, typing=True)
            idle[-2] = gr.Textbox(value=message, interactive=True)  # the message comes back, to send again
            yield compare_outputs(display_messages(history), history, None, *reply_boxes(page, "", ""), "", idle)
            raise gr.Error(describe_error(error), print_exception=False) from None
        new_round = {
            "conversation": conversation,
            "replies": {"a": texts["a"], "b": texts["b"]},
            "models": {"a": shown["a"].name, "b": shown["b"].name},
            "settings": settings,
            "voted": False,
            "comparison": uuid.uuid4().hex,  # the votes table stores one vote for it, however many requests race
        }
        voting = compare_controls(voting=True, voted=False, typing=False)
        yield compare_outputs(
            gr.skip(),
            history,
            new_round,
            texts["a"] or EMPTY_REPLY,
            texts["b"] or EMPTY_REPLY,
            "Which reply is better? The models' names are shown after your vote.",
            voting,
        )

    return compare_send


def make_vote(page: PageSetup, winner: str) -> Callable[[dict | None], list[Any]]:
    """The handler of one vote button: store the vote, reveal which model wrote which reply, update Results."""
    import gradio as gr

    def cast_vote(round_: dict | None) -> list[Any]:
        if not round_ or round_.get("voted"):
            gr.Warning("You already voted on these replies." if round_ else "Send a message first.")
            return [gr.skip()] * 12
        settings = {**round_["settings"], "model": page.served.name}  # whose side the results are counted from
        replies, shown = round_["replies"], round_["models"]
        try:
            record_vote(
                page.votes_db,
                round_["conversation"],
                replies["a"],
                replies["b"],
                shown["a"],
                shown["b"],
                winner,
                settings,
                comparison=round_.get("comparison"),
            )
            tally = tally_votes(read_votes(page.votes_db))
        except VoteAlreadyCounted:
            # Another request for these replies (a double click, a second tab, a script) was stored first.
            gr.Warning("Your vote on these replies was already counted.")
            return [gr.skip()] * 12
        except VotesError as error:
            LOGGER.exception("vote not stored")
            raise gr.Error(f"Your vote could not be stored: {error}", print_exception=False) from None
        round_ = {**round_, "voted": True}
        revealed = reply_boxes(page, replies["a"] or EMPTY_REPLY, replies["b"] or EMPTY_REPLY, shown)
        line = reveal_text(round_, winner, page.titles, page.served.name, tally)
        chosen = compare_controls(voting=False, voted=True, typing=False)
        return [round_, *revealed, line, *chosen, results_rows(page.votes_db, page.titles)]

    return cast_vote


def make_continue(page: PageSetup, side: str) -> Callable[[dict | None], list[Any]]:
    """The handler of "Continue with Reply A/B": after the vote, the conversation goes on from that reply."""
    import gradio as gr

    def continue_with(round_: dict | None) -> list[Any]:
        if not round_ or not round_.get("voted"):
            gr.Warning("Vote first; then the conversation goes on from the reply you choose.")
            return [gr.skip()] * COMPARE_OUTPUTS
        history = round_["conversation"] + [{"role": "assistant", "content": round_["replies"][side]}]
        idle = compare_controls(voting=False, voted=False, typing=True)
        return compare_outputs(display_messages(history), history, None, *reply_boxes(page, "", ""), "", idle)

    return continue_with


def make_compare_reset(page: PageSetup) -> Callable[[], list[Any]]:
    """The handler of Start over (and of the Chatbot's trash button): an empty conversation, ready to type."""

    def compare_reset() -> list[Any]:
        idle = compare_controls(voting=False, voted=False, typing=True, clear_box=True)
        return compare_outputs([], [], None, *reply_boxes(page, "", ""), "", idle)

    return compare_reset


def wire_compare_tab(
    page: PageSetup, tab: CompareTab, decoding: list[Any], results: Any, generation: dict, instant: dict
) -> None:
    """Compare's events: Send to both, the four votes (which also refresh the `results` table), Continue with
    Reply A/B, and Start over (or the Chatbot's trash button).

    Args:
        generation, instant: the queue settings of generating events and of millisecond ones (see build_app).
    """
    import gradio as gr

    compare_out = tab.outputs()
    compare_event = gr.on(
        [tab.send.click, tab.box.submit],
        make_compare_send(page),
        [tab.box, tab.history, tab.round_state, *decoding],
        compare_out,
        api_name="compare",
        show_progress="hidden",
        **generation,
    )
    vote_out = [
        tab.round_state,
        tab.reply_a,
        tab.reply_b,
        tab.reveal,
        *tab.vote_buttons.values(),
        tab.continue_row,
        tab.box,
        tab.send,
        results,
    ]
    for winner, button in tab.vote_buttons.items():
        button.click(make_vote(page, winner), [tab.round_state], vote_out, api_name=f"vote_{winner}", **instant)
    for side, button in (("a", tab.continue_a), ("b", tab.continue_b)):
        button.click(make_continue(page, side), [tab.round_state], compare_out, api_name=f"continue_{side}", **instant)
    reset = {
        "fn": make_compare_reset(page),
        "inputs": None,
        "outputs": compare_out,
        "cancels": [compare_event],
        **instant,
    }
    tab.new.click(api_name="compare_reset", **reset)
    tab.chatbot.clear(api_visibility="private", **reset)


# --------------------------------------------------------------------------------------------------------------
# The page: Results, and the whole page
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ResultsTab:
    """The Results tab's components that its events read or change."""

    table: Any
    refresh: Any


def build_results_tab(page: PageSetup) -> ResultsTab:
    """The Results tab: the blind votes counted per pair of models, and a Refresh button."""
    import gradio as gr

    with gr.Tab("Results", id="results"):
        gr.Markdown(
            "Blind votes so far, counted from the side of the model this page serves. Win rate = "
            "(wins + half the ties and both-bad votes) / votes; the interval is the 95% Wilson "
            f"interval. Stored in `{page.votes_db}`; `python -m gpt2ft votes --db {page.votes_db}` prints them "
            "as JSON."
        )
        table = gr.Dataframe(
            value=results_rows(page.votes_db, page.titles),
            headers=RESULT_HEADERS,
            datatype=RESULT_TYPES,
            column_widths=RESULT_WIDTHS,
            interactive=False,
            elem_id="results-table",
            wrap=True,
        )
        refresh = gr.Button("Refresh", size="sm", elem_id="results-refresh")
    return ResultsTab(table=table, refresh=refresh)


def wire_results_tab(page: PageSetup, tab: ResultsTab, app: Any, instant: dict) -> None:
    """Results' events: the table is read again on Refresh and whenever the page is opened."""
    votes_db, titles = page.votes_db, page.titles
    tab.refresh.click(lambda: results_rows(votes_db, titles), None, tab.table, api_name="results", **instant)
    app.load(lambda: results_rows(votes_db, titles), None, tab.table, api_visibility="private", **instant)


def build_app(
    served: ServedModel,
    opponent: ServedModel | None,
    votes_db: str | Path = DEFAULT_VOTES_DB,
    time_limit: float = DEFAULT_TIME_LIMIT_S,
    concurrency: int = DEFAULT_CONCURRENCY,
    rng: random.Random | None = None,
) -> Any:
    """The Gradio app (not launched): tabs Chat, Compare and Results, and the decoding settings beside them.

    Args:
        served: the model the page is about (`--model`).
        opponent: the model it is compared with (`--compare-with`), or None to leave Compare disabled.
        votes_db: the SQLite file the votes go to (created by init_votes_db before this).
        time_limit: seconds a reply may take.
        concurrency: generations at once; more requests wait in Gradio's queue.
        rng: the A/B shuffle (the operating system's randomness by default).

    Returns:
        gradio.Blocks with its queue configured; launch it with launch_app.
    """
    import gradio as gr

    page = setup_page(served, opponent, votes_db, time_limit, rng)
    with gr.Blocks(title=f"gpt2ft · {served.title}", analytics_enabled=False) as app:
        gr.Markdown(f"# Talk to {served.title}", elem_id="title")
        gr.Markdown(format_model_line(served), elem_id="model-line")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=480):
                with gr.Tabs():
                    chat = build_chat_tab(page)
                    compare = build_compare_tab(page)
                    results = build_results_tab(page)
            with gr.Column(scale=1, min_width=250):
                decoding = build_decoding_panel(page)

        generation = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
        # Votes, resets and the results table run outside the generation limit (concurrency_limit=None): they take
        # milliseconds and must never wait behind other users' replies.
        instant = {"concurrency_limit": None}
        wire_chat_tab(page, chat, decoding, generation, instant)
        wire_compare_tab(page, compare, decoding, results.table, generation, instant)
        wire_results_tab(page, results, app, instant)
    app.queue(default_concurrency_limit=concurrency)
    return app


# --------------------------------------------------------------------------------------------------------------
# Launching: command line and notebook
# --------------------------------------------------------------------------------------------------------------


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`USER:PASSWORD` -> (user, password); the password may itself hold colons.

    Raises:
        ServeError: no colon, or an empty user or password.
    """
    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user or not password:
        raise ServeError("--auth: expected USER:PASSWORD")
    return user, password


def check_port_free(host: str, port: int) -> None:
    """Fail before loading anything when the port is taken (Gradio would only say so after the models load).

    Raises:
        ServeError: the port is out of range, in use, or the host cannot be bound.
    """
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ServeError(f"--host {host}: cannot be resolved ({error})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR as the server itself sets it: a port left in TIME_WAIT by a previous run is free to use,
        # while one with a live listener still fails to bind.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = "already in use" if error.errno in (98, 48, 10048) else (error.strerror or str(error))
            raise ServeError(f"--port {port}: cannot listen on {host}:{port} ({reason})") from None


def share_warning(auth: tuple[str, str] | None) -> str:
    text = "warning: --share creates a public gradio.live link: anyone who has it can use this page and its models"
    return text + ("." if auth else "; add --auth USER:PASSWORD to ask for a password.")


def launch_app(
    app: Any,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    inline: bool | None = False,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Start the page's server; returns its local URL.

    Args:
        host: the interface to listen on: 127.0.0.1 (this machine only) unless told otherwise.
        port: the port; None picks a free one.
        share: also create a public gradio.live link (needs internet).
        inline: show the page inside a notebook cell.
        block: wait until the server is stopped (Ctrl-C), as the command line does; False returns at once.
    """
    import gradio as gr

    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
    try:
        launched = app.launch(
            server_name=host,
            server_port=port,
            share=share,
            auth=auth,
            inline=inline,
            prevent_thread_lock=not block,
            quiet=quiet,
            show_error=False,
            ssr_mode=False,
            theme=theme,
            css=CSS,
            footer_links=["api", "gradio"],
            height=950,  # of the notebook's inline frame: the whole page without an inner scrollbar
            auth_message="This page is password-protected." if auth else None,
            max_file_size=MAX_UPLOAD_BYTES,
        )
    except OSError as error:  # the port was taken after check_port_free (another server started in between)
        raise ServeError(f"--port {port}: cannot listen on {host} ({error})") from None
    return launched[1]


def start_server(
    model: str,
    compare_with: str | None = None,
    votes_db: str | Path = DEFAULT_VOTES_DB,
    time_limit: float = DEFAULT_TIME_LIMIT_S,
    concurrency: int = DEFAULT_CONCURRENCY,
    loaded: tuple[Any, Any] | None = None,
) -> Any:
    """Check the votes database, load the models and build the app (everything that can fail before the server
    starts, so that a bad folder is an error before any port is opened).

    Args:
        model: the fine-tuned model's folder (or a Hub id).
        compare_with: the model to compare with; None = the base model recorded in `model`'s training config
            (no Compare when there is none).
        loaded: (model, tokenizer) already in memory for `model` (the notebook's), instead of loading them again.

    Raises:
        ModelError, VotesError.
    """
    served = load_served_model(model, *(loaded or (None, None)))
    opponent_name = compare_with or default_opponent(model)
    opponent = None
    if opponent_name == model:
        opponent = served
    elif compare_with:
        opponent = load_served_model(compare_with)  # asked for by name: failing to load it is an error
    elif opponent_name:
        # The base model recorded at training time may be a Hub id out of reach or a folder since moved: the page
        # still chats, without the Compare tab, and says why.
        try:
            opponent = load_served_model(opponent_name)
        except ModelError as error:
            print(
                f"warning: no Compare tab: the base model {opponent_name} cannot be loaded ({error}); "
                "pass --compare-with MODEL",
                file=sys.stderr,
            )
    init_votes_db(votes_db)  # after the models: a bad model folder must leave no file behind
    return build_app(served, opponent, votes_db=votes_db, time_limit=time_limit, concurrency=concurrency)


def serve_in_notebook(
    model_dir: str,
    enabled: bool,
    compare_with: str | None = None,
    votes_db: str | Path = DEFAULT_VOTES_DB,
    model: Any = None,
    tokenizer: Any = None,
    share: bool | None = None,
    auth: tuple[str, str] | None = None,
    port: int | None = None,
) -> Any:
    """The notebook's web demo: the `serve` page shown inside the cell; on Colab also through a public share link
    (Colab's own machine is not reachable from your browser otherwise).

    Args:
        model_dir: the fine-tuned model's folder.
        enabled: the notebook's `launch_web_demo` parameter; False (the default) does nothing, so "Run all" and
            papermill never start a server.
        model, tokenizer: the model already loaded in the notebook (no second copy in memory).
        share: None = only on Colab.
        port: None = the first free port from 7860.

    Returns:
        The running app (`.close()` stops it), or None when not enabled.
    """
    if not enabled:
        print("Web demo off: set launch_web_demo = True in the parameters cell to open it here.")
        return None
    share = in_colab() if share is None else share
    if share:
        print(share_warning(auth))
    app = start_server(model_dir, compare_with, votes_db, loaded=(model, tokenizer) if model is not None else None)
    launch_app(app, port=port, share=share, auth=auth, inline=True, block=False)
    return app
