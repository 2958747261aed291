"""gpt2ft.serve and `python -m gpt2ft serve`: input cleaning, decoding settings, streaming with a time limit and
the context cut, the live page over Gradio's HTTP API (chat, bad input, 20 concurrent chats, blind votes from many
sessions), the notebook entry point, and the command's one-line errors.

    pytest tests/test_serve.py

The page is launched once per module on a free port of 127.0.0.1 in a background thread, serving a copy of the
tiny GPT-2 "fine-tuned" (with a training_config.json naming a second tiny model as its base, and gpt2ft's sampling
generation config) against that base. Nothing here needs the network; share links are never created.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from conftest import ROOT, build_tiny_model_dir  # noqa: E402

from gpt2ft.cli import main  # noqa: E402
from gpt2ft.serve import (  # noqa: E402
    EMPTY_REPLY,
    MAX_MESSAGE_CHARS,
    NO_LABEL,
    GenerationTimeout,
    ServedModel,
    ServeError,
    build_app,
    check_port_free,
    clean_message,
    decoding_settings,
    default_opponent,
    describe_model,
    display_messages,
    format_model_line,
    generation_kwargs,
    launch_app,
    make_vote,
    parse_auth,
    saved_decoding,
    serve_in_notebook,
    setup_page,
    share_warning,
    start_server,
    stream_replies,
)
from gpt2ft.votes import read_votes  # noqa: E402

# Gradio's queue statistics call pandas APIs that pandas 3 deprecates; not this project's code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

PERPLEXITIES = {"eval_perplexity": 18.42, "test_perplexity": 18.91}
# temperature, top_p, max_new_tokens, greedy, emotion, act: the side panel's six controls (Gradio's plain HTTP API
# wants every one; its Python client fills in the defaults of those left out).
CHAT_ARGS = (0.8, 0.9, 12, False, "any", "any")


# --------------------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_browser.py
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_served_pair(root: Path) -> tuple[Path, Path]:
    """Two tiny GPT-2 folders: `base` (random init, seed 1, transformers' greedy defaults, like the Hub's gpt2) and
    `gpt2_finetuned` (seed 0) saved the way gpt2ft saves a model: its generation_config.json samples (plus
    min_new_tokens, so the random-init model never answers with nothing) and its training_config.json names `base`
    as the model it started from and holds validation/test perplexities."""
    from gpt2ft.generate import build_generation_config
    from gpt2ft.modeling import load_tokenizer

    base = build_tiny_model_dir(root / "base", seed=1)
    tuned = build_tiny_model_dir(root / "gpt2_finetuned", seed=0)
    build_generation_config(load_tokenizer(str(tuned)), max_new_tokens=12, min_new_tokens=6).save_pretrained(tuned)
    training_config = {"config": {"model": str(base), "logs_dir": str(root / "logs")}, "metrics": PERPLEXITIES}
    (tuned / "training_config.json").write_text(json.dumps(training_config), encoding="utf-8")
    return tuned, base


def start_live_app(tuned: Path, votes_db: Path, **options):
    """The real page (start_server + launch_app, as `serve` does) on a free port, not blocking."""
    app = start_server(str(tuned), None, votes_db, **options)
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    return app, url


def message_texts(chatbot: list) -> list[tuple[str, str]]:
    """(role, text) of each message of a Chatbot value as the HTTP API returns it."""
    texts = []
    for message in chatbot:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        texts.append((message["role"], content))
    return texts


@pytest.fixture(scope="module")
def served_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_served_pair(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def live_app(served_pair, tmp_path_factory):
    tuned, base = served_pair
    votes_db = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    app, url = start_live_app(tuned, votes_db, time_limit=30, concurrency=4)
    yield SimpleNamespace(app=app, url=url, votes_db=votes_db, tuned=str(tuned), base=str(base))
    app.close()


def call_plain_http(url: str, api_name: str, data: list) -> tuple[str, object]:
    """One request through Gradio's plain HTTP API (POST the inputs, then read the result's event stream).

    The body is ASCII JSON, so text no client library would encode (a lone UTF-16 surrogate, as a broken browser
    or script may send) reaches the server as `\\ud800`. Returns (the last event's name, its data).
    """
    body = json.dumps({"data": data}).encode("ascii")
    request = urllib.request.Request(
        f"{url}gradio_api/call/{api_name}", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.loads(response.read())["event_id"]
    event, payload = "", None
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=120) as stream:
        for raw in stream:
            line = raw.decode("utf-8").strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = json.loads(line.split(":", 1)[1])
                if event in ("complete", "error"):
                    break
    return event, payload


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


# --------------------------------------------------------------------------------------------------------------
# Input and settings
# --------------------------------------------------------------------------------------------------------------


def test_clean_message_handles_empty_huge_broken_and_special_input():
    assert clean_message("")[0] == "" and clean_message("  \n\t ")[0] == "" and clean_message(None)[0] == ""
    text, notice = clean_message("x" * 199_999 + "END")
    assert len(text) == MAX_MESSAGE_CHARS + 1 and text.endswith("END") and text.startswith("…")
    assert notice and "200,002" in notice
    assert clean_message("Hi!")[1] is None
    text, _ = clean_message("bro\ud800ken\x00 text\x1b[31m")  # a lone surrogate, NUL and an escape sequence
    text.encode("utf-8")  # encodable now
    assert "\x00" not in text and "\x1b" not in text and "ken" in text
    text, _ = clean_message("Hi<|endoftext|>there", special_tokens=["<|endoftext|>"])
    assert "<|endoftext|>" not in text and "Hi" in text and "there" in text
    markup = "<b>bold</b> <script>alert(1)</script> **star**"
    assert clean_message(markup)[0] == markup  # markup is text for the model; the page shows it escaped


def test_decoding_settings_clamp_what_the_http_api_may_send():
    defaults = {
        "greedy": False,
        "temperature": 0.8,
        "top_p": 0.9,
        "max_new_tokens": 50,
        "top_k": 0,
        "no_repeat_ngram_size": 4,
        "repetition_penalty": None,
    }
    settings = decoding_settings(defaults, 99, -1, 10_000, 0, token_limit=128)
    assert settings == {
        "greedy": False,
        "temperature": 2.0,
        "top_p": 0.05,
        "max_new_tokens": 128,
        "top_k": 0,
        "no_repeat_ngram_size": 4,
    }
    settings = decoding_settings(defaults, "nan", None, "abc", True, token_limit=128)
    assert (settings["temperature"], settings["top_p"], settings["max_new_tokens"], settings["greedy"]) == (
        0.8,
        0.9,
        50,
        True,
    )
    assert (
        generation_kwargs(settings)["do_sample"] is False and generation_kwargs({"greedy": False})["do_sample"] is True
    )


def test_saved_decoding_reads_the_generation_config(served_pair):
    from gpt2ft.generate import load_for_generation

    tuned, base = served_pair
    tuned_defaults = saved_decoding(load_for_generation(str(tuned))[0])
    assert (tuned_defaults["greedy"], tuned_defaults["temperature"], tuned_defaults["top_p"]) == (False, 0.8, 0.9)
    # No prompt-wide n-gram ban is saved: gpt2ft's replies use generate.ReplyNoRepeatNGram instead.
    assert tuned_defaults["max_new_tokens"] == 12 and tuned_defaults["no_repeat_ngram_size"] is None
    assert saved_decoding(load_for_generation(str(base))[0])["greedy"] is True  # transformers' default: greedy


def test_model_description_from_training_config_or_metrics_json(served_pair, tmp_path):
    tuned, base = served_pair
    assert describe_model(str(tuned)) == {"base_model": str(base), **PERPLEXITIES}
    assert default_opponent(str(tuned)) == str(base)
    assert default_opponent(str(base)) is None and describe_model("gpt2")["eval_perplexity"] is None
    # A training_config.json without metrics: the run's logs/metrics.json is read instead.
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.json").write_text(json.dumps({"eval_perplexity": 20.5, "test_perplexity": 21}))
    (folder / "training_config.json").write_text(
        json.dumps({"config": {"model": "gpt2", "logs_dir": str(tmp_path / "logs")}})
    )
    assert describe_model(str(folder)) == {"base_model": "gpt2", "eval_perplexity": 20.5, "test_perplexity": 21.0}
    line = format_model_line(ServedModel("model", None, None, "model", describe_model(str(folder))))
    assert "`gpt2`" in line and "validation perplexity **20.50**" in line and "test perplexity **21.00**" in line
    assert "no perplexity" in format_model_line(ServedModel("gpt2", None, None, "gpt2", describe_model("gpt2")))


def test_display_shows_a_note_for_an_empty_reply():
    shown = display_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}])
    assert shown[1]["content"] == EMPTY_REPLY and shown[0]["content"] == "Hi"


def test_auth_and_port_checks():
    assert parse_auth("me:pa:ss") == ("me", "pa:ss") and parse_auth(None) is None
    for bad in ("me", ":pw", "me:"):
        with pytest.raises(ValueError, match="--auth"):
            parse_auth(bad)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match=f"--port {busy.getsockname()[1]}.*in use"):
            check_port_free("127.0.0.1", busy.getsockname()[1])
    check_port_free("127.0.0.1", free_port())
    assert "--auth" in share_warning(None) and "public" in share_warning(None)


# --------------------------------------------------------------------------------------------------------------
# Streaming generation: tokens as they come, the context cut, the time limit
# --------------------------------------------------------------------------------------------------------------


class RecordingModel:
    """A model that records each generate() call's prompt and output lengths, and can hold generation at a gate
    (to keep requests busy without sleeping). Everything else is the wrapped model's."""

    def __init__(self, model, gate: threading.Event | None = None):
        self.wrapped = model
        self.gate = gate
        self.calls: list[tuple[int, int]] = []
        self.prompts: list[list[int]] = []  # each call's prompt ids

    def generate(self, input_ids, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        if self.gate is not None:
            self.gate.wait(timeout=60)
        output = self.wrapped.generate(input_ids=input_ids, **kwargs)
        self.calls.append((input_ids.shape[1], output.shape[1]))
        return output

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def served(model, tokenizer, name="tiny") -> ServedModel:
    return ServedModel(name=name, model=model, tokenizer=tokenizer, title=name, info={})


def conditioned_tokenizer(model_dir, fields=("emotion", "act")):
    """The tiny model's tokenizer (a fresh copy) with a template that takes `fields`, as `train --condition` saves
    it: a conditioned model, as far as the prompt goes, without training one."""
    from gpt2ft.chat_format import template_of
    from gpt2ft.controls import conditioned_template
    from gpt2ft.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = conditioned_template(template_of(tokenizer), fields)
    return tokenizer


def test_stream_replies_yields_growing_text_for_each_model(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    # Greedy with EOS suppressed: the random-init model writes the same 16 tokens every time (it would otherwise
    # often end its turn at once).
    settings = {"greedy": True, "max_new_tokens": 16, "suppress_tokens": [eos]}
    models = {"a": served(tiny_model, tiny_tokenizer), "b": served(tiny_model, tiny_tokenizer)}
    updates = list(
        stream_replies(models, [{"role": "user", "content": "Hello, how are you?"}], settings, time_limit=30)
    )
    assert len(updates) >= 6  # pieces of text as tokens arrive (not one block at the end), then the final texts
    final = updates[-1]
    assert set(final) == {"a", "b"} and final["a"] and final["b"]
    for key in ("a", "b"):
        shown = list(dict.fromkeys(update[key] for update in updates if update[key]))  # distinct, in order
        partial, last = shown[:-1], shown[-1]
        assert last == final[key] and len(partial) >= 2  # the text grew token by token while it was generated
        assert all(later.startswith(earlier) for earlier, later in zip(partial, partial[1:]))
        # The finished reply is the streamed text, trimmed, plus any character held back while half-written.
        assert last.startswith(partial[-1].strip())


def test_the_context_is_cut_to_the_most_recent_whole_turns(tiny_model, tiny_tokenizer):
    recording = RecordingModel(tiny_model)
    turns = [f"Turn number {index} says hello." for index in range(80)]  # far more than 256 tokens
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    history[-1] = {"role": "user", "content": turns[-1]}
    history.append({"role": "user", "content": "y" * 200_000 + " What do you think?"})
    settings = {"greedy": True, "max_new_tokens": 20}
    list(stream_replies({"m": served(recording, tiny_tokenizer)}, history[:-1], settings, time_limit=30))
    prompt_length, _ = recording.calls[-1]
    assert prompt_length <= 256 - 20  # the window minus the room for the reply
    # The prompt is a suffix of whole turns: rebuild it and compare with what the model saw.
    from gpt2ft.generate import build_prompt_ids

    prompt = build_prompt_ids(tiny_tokenizer, history[:-1], 256 - 20)
    text = tiny_tokenizer.decode(prompt)
    kept = [turn for turn in text.split(tiny_tokenizer.eos_token) if turn]
    assert kept == turns[-len(kept) :] and 1 < len(kept) < len(turns)
    # A single 200,000-character message: it is cut too (keeping its end), and a reply still comes.
    list(stream_replies({"m": served(recording, tiny_tokenizer)}, history[-1:], settings, time_limit=30))
    assert recording.calls[-1][0] <= 256 - 20


def test_generation_stops_at_the_time_limit(tiny_model, tiny_tokenizer):
    recording = RecordingModel(tiny_model)
    settings = {"greedy": False, "max_new_tokens": 200, "min_new_tokens": 200}
    list(stream_replies({"m": served(recording, tiny_tokenizer)}, ["Hi"], settings, time_limit=1e-4))
    prompt_length, output_length = recording.calls[-1]
    assert output_length - prompt_length < 200  # max_time ended it long before max_new_tokens


def test_a_generation_that_never_starts_raises_a_timeout(tiny_model, tiny_tokenizer):
    gate = threading.Event()  # never opened while the test waits: generate() is stuck before its first token
    stuck = served(RecordingModel(tiny_model, gate), tiny_tokenizer)
    with pytest.raises(GenerationTimeout, match="time limit"):
        list(stream_replies({"m": stuck}, ["Hi"], {"max_new_tokens": 2}, time_limit=0.05, grace_s=0.05))
    gate.set()


def test_a_failing_generation_is_reported_not_lost(tiny_tokenizer):
    class Broken:
        config = SimpleNamespace(n_positions=256)
        generation_config = SimpleNamespace(max_new_tokens=5)

        def parameters(self):
            import torch

            yield torch.zeros(1)

        def generate(self, **kwargs):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream_replies({"m": served(Broken(), tiny_tokenizer)}, ["Hi"], {}, time_limit=5))


# --------------------------------------------------------------------------------------------------------------
# Controls: the Emotion and Act selectors, for a model trained with --condition
# --------------------------------------------------------------------------------------------------------------


def test_settings_from_checks_the_labels_and_puts_them_under_controls(tiny_model, tiny_tokenizer, tiny_model_dir):
    tagged = served(tiny_model, conditioned_tokenizer(tiny_model_dir), "tagged")
    plain = served(tiny_model, tiny_tokenizer, "plain")
    page = setup_page(tagged, plain, "unused.sqlite", 30, None)
    assert page.controls == ("emotion", "act")  # what one of the models reads: the selectors shown
    decoding = CHAT_ARGS[:4]
    assert page.settings_from(*decoding, "happiness", NO_LABEL)["controls"] == {"emotion": "happiness"}
    both = page.settings_from(*decoding, "sadness", "question")
    assert both["controls"] == {"emotion": "sadness", "act": "question"} and both["max_new_tokens"] == 12
    for nothing in ((NO_LABEL, NO_LABEL), ("any", None), ("", "")):
        assert page.settings_from(*decoding, *nothing)["controls"] == {}
    assert page.settings_from(*decoding)["controls"] == {}  # a client that sends only the four decoding values
    with pytest.raises(ServeError, match="Emotion 'joy' is not a DailyDialog emotion"):
        page.settings_from(*decoding, "joy", NO_LABEL)
    with pytest.raises(ServeError, match="Act 'chat' is not a DailyDialog act"):
        page.settings_from(*decoding, NO_LABEL, "chat")
    assert "controls" not in generation_kwargs(both)  # each model gets its own share, from stream_replies
    # Only plain models: no selectors, and a label sent anyway (the HTTP API) is refused, never silently dropped.
    plain_page = setup_page(plain, None, "unused.sqlite", 30, None)
    assert plain_page.controls == ()
    with pytest.raises(ServeError, match="no model on this page was trained with emotion controls"):
        plain_page.settings_from(*decoding, "happiness", NO_LABEL)
    emotion_only = setup_page(
        served(tiny_model, conditioned_tokenizer(tiny_model_dir, ("emotion",))), None, "x", 30, None
    )
    assert emotion_only.controls == ("emotion",)


def test_the_conditioned_model_reads_the_label_and_a_plain_one_beside_it_none(
    tiny_model, tiny_tokenizer, tiny_model_dir
):
    from gpt2ft.controls import tag_text

    tokenizer = conditioned_tokenizer(tiny_model_dir)
    tagged, plain = RecordingModel(tiny_model), RecordingModel(tiny_model)
    page = setup_page(served(tagged, tokenizer, "tagged"), served(plain, tiny_tokenizer, "plain"), "x", 30, None)
    history = [{"role": "user", "content": "Do you like tea ?"}]
    tag = tag_text({"emotion": "happiness"}, ("emotion", "act"))
    assert tag == "[emotion: happiness]\n"
    settings = page.settings_from(0.8, 0.9, 4, True, "happiness", NO_LABEL)
    final = list(stream_replies(page.models, history, settings, time_limit=30))[-1]
    assert set(final) == {"model", "opponent"}  # both replied: the plain model was not refused
    asked_prompt = tokenizer.decode(tagged.prompts[-1])
    assert asked_prompt.endswith("Do you like tea ?<|endoftext|>" + tag)
    assert "emotion" not in tiny_tokenizer.decode(plain.prompts[-1])
    # Nothing asked for: the conditioned model's prompt has no tag either.
    list(stream_replies(page.models, history, page.settings_from(0.8, 0.9, 4, True, NO_LABEL, NO_LABEL), 30))
    assert tokenizer.decode(tagged.prompts[-1]).endswith("Do you like tea ?<|endoftext|>")
    assert "[" not in tokenizer.decode(tagged.prompts[-1])


@pytest.fixture(scope="module")
def conditioned_page(tmp_path_factory, tiny_model_dir):
    """A live page serving a conditioned tiny model ("tagged") beside a plain one ("plain"), both recording their
    prompts."""
    from gpt2ft.modeling import load_model, load_tokenizer
    from gpt2ft.votes import init_votes_db

    tagged = served(RecordingModel(load_model(str(tiny_model_dir))), conditioned_tokenizer(tiny_model_dir), "tagged")
    plain = served(RecordingModel(load_model(str(tiny_model_dir))), load_tokenizer(str(tiny_model_dir)), "plain")
    votes_db = init_votes_db(tmp_path_factory.mktemp("controls_votes") / "votes.sqlite")
    app = build_app(tagged, plain, votes_db=votes_db, concurrency=2)
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    yield SimpleNamespace(url=url, votes_db=votes_db, tagged=tagged, plain=plain)
    app.close()


def selector_props(url: str) -> dict[str, dict]:
    config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
    return {
        item["props"]["label"]: item["props"]
        for item in config["components"]
        if item.get("type") == "dropdown" and item["props"].get("label") in ("Emotion", "Act")
    }


def test_the_selectors_show_only_for_a_model_that_reads_labels(conditioned_page, live_app):
    from gpt2ft.conversations import LABELS

    shown = selector_props(conditioned_page.url)
    assert set(shown) == {"Emotion", "Act"} and all(props["visible"] is True for props in shown.values())
    assert [choice[0] for choice in shown["Emotion"]["choices"]] == [NO_LABEL, *LABELS["emotion"]]
    assert [choice[0] for choice in shown["Act"]["choices"]] == [NO_LABEL, *LABELS["act"]]
    assert shown["Emotion"]["value"] == NO_LABEL and "tagged" in shown["Emotion"]["info"]
    assert "plain" not in shown["Emotion"]["info"]  # the note names the models that read it
    hidden = selector_props(live_app.url)  # two plain models
    assert set(hidden) == {"Emotion", "Act"} and all(props["visible"] is False for props in hidden.values())


def test_the_page_asks_for_the_label_chosen_and_the_vote_stores_it(conditioned_page):
    page = conditioned_page
    event, outputs = call_plain_http(page.url, "chat", ["Do you like tea ?", 0.8, 0.9, 4, True, "surprise", "question"])
    assert event == "complete", outputs
    prompt = page.tagged.tokenizer.decode(page.tagged.model.prompts[-1])
    assert prompt.endswith("<|endoftext|>[emotion: surprise; act: question]\n")
    client = client_for(page.url)
    client.predict("Where are you going ?", 0.8, 0.9, 4, True, "happiness", NO_LABEL, api_name="/compare")
    tagged_prompt = page.tagged.tokenizer.decode(page.tagged.model.prompts[-1])
    plain_prompt = page.plain.tokenizer.decode(page.plain.model.prompts[-1])
    assert tagged_prompt.endswith("Where are you going ?<|endoftext|>[emotion: happiness]\n")
    assert plain_prompt.endswith("Where are you going ?<|endoftext|>") and "emotion" not in plain_prompt
    client.predict(api_name="/vote_tie")
    row = read_votes(page.votes_db)[-1]
    assert row["settings"]["controls"] == {"emotion": "happiness"} and row["winner"] == "tie"
    # Nothing asked for: stored as no controls.
    client.predict("Is it raining ?", *CHAT_ARGS, api_name="/compare")
    client.predict(api_name="/vote_a")
    assert read_votes(page.votes_db)[-1]["settings"]["controls"] == {}


def test_a_label_outside_the_choices_is_refused_in_one_line(conditioned_page, live_app):
    before = len(conditioned_page.tagged.model.prompts)
    event, payload = call_plain_http(conditioned_page.url, "chat", ["Hi", 0.8, 0.9, 4, True, "joy", NO_LABEL])
    assert event == "error" and "joy" in json.dumps(payload)
    assert len(conditioned_page.tagged.model.prompts) == before  # nothing generated
    # A page of plain models hides the selectors; a label sent anyway is refused, naming why.
    event, payload = call_plain_http(live_app.url, "chat", ["Hi", 0.8, 0.9, 4, True, "happiness", NO_LABEL])
    assert event == "error" and "no model on this page was trained with emotion controls" in json.dumps(payload)


# --------------------------------------------------------------------------------------------------------------
# The live page over Gradio's HTTP API
# --------------------------------------------------------------------------------------------------------------


def post_upload(url: str, name: str, content: bytes) -> tuple[int, str]:
    """POST one file to Gradio's upload route as a browser would (multipart/form-data): (status, body)."""
    boundary = "gpt2ft-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError) as error:  # refused while the rest was still being sent
        return 0, str(error)


@pytest.mark.parametrize("size", [30 * 2**20, 1024, 1])
def test_the_page_accepts_no_uploads(live_app, size):
    """The page has no upload component: a file of any size is refused (413, or the connection closed while a large
    one is still being sent) and nothing is stored for the page's address to serve back."""
    from gradio.utils import get_upload_folder

    name = f"payload-{uuid.uuid4().hex}.html"  # a name no earlier run can have left in Gradio's upload folder
    status, body = post_upload(live_app.url, name, b"x" * size)
    assert (status == 413 and "maximum allowed size" in body) or (status == 0 and size > 2**20), (status, body)
    assert not list(Path(get_upload_folder()).rglob(name))


def test_page_serves_its_html_and_names_the_model(live_app):
    with urllib.request.urlopen(live_app.url, timeout=30) as response:
        assert response.status == 200
    config = json.loads(urllib.request.urlopen(live_app.url + "config", timeout=30).read())
    text = json.dumps(config)
    assert "Talk to gpt2_finetuned" in text and "validation perplexity **18.42**" in text
    for label in ("A is better", "B is better", "Tie", "Both are bad", "New conversation"):
        assert f'"{label}"' in text


def test_chat_streams_a_reply_over_http(live_app):
    client = client_for(live_app.url)
    job = client.submit("Hello , how are you ?", *CHAT_ARGS, api_name="/chat")
    chatbot, box = job.result(timeout=120)
    messages = message_texts(chatbot)
    assert messages[0] == ("user", "Hello , how are you ?")
    assert messages[1][0] == "assistant" and messages[1][1] and messages[1][1] != "…"
    outputs = job.outputs()
    assert outputs[0][1] == ""  # the message box is cleared when the message is taken
    streamed = [message_texts(output[0])[-1][1] for output in outputs]
    assert len(streamed) >= 3 and len(set(streamed)) >= 3  # "…", pieces of the reply, the finished reply
    # The conversation goes on: the second request sees the first exchange (server-side session state).
    chatbot, _ = client.predict("Do you like tea ?", *CHAT_ARGS, api_name="/chat")
    assert [role for role, _ in message_texts(chatbot)] == ["user", "assistant", "user", "assistant"]
    chatbot, _ = client.predict(api_name="/chat_reset")
    assert chatbot == []


@pytest.mark.parametrize(
    "message",
    [
        "x" * 200_000,
        "\ud800 broken surrogate \udfff and NUL \x00 and escape \x1b[2J",
        "Ã©tÃ© â€™ mojibake ï¿½",
        "<script>alert('x')</script><img src=x onerror=alert(1)> **bold** <|endoftext|> `code` [link](javascript:x)",
    ],
    ids=["200k-chars", "broken-unicode", "mojibake", "markup"],
)
def test_bad_input_gets_a_reply_not_an_error(live_app, message):
    event, outputs = call_plain_http(live_app.url, "chat", [message, *CHAT_ARGS])
    assert event == "complete", outputs
    messages = message_texts(outputs[0])
    assert [role for role, _ in messages] == ["user", "assistant"]
    user_text = messages[0][1]
    assert len(user_text) <= MAX_MESSAGE_CHARS + 1 and "<|endoftext|>" not in user_text and "\x00" not in user_text
    assert messages[1][1]


@pytest.mark.parametrize("message", ["", "   \n\t  "])
def test_an_empty_message_changes_nothing(live_app, message):
    client = client_for(live_app.url)
    chatbot, box = client.predict(message, *CHAT_ARGS, api_name="/chat")
    assert chatbot == [] and box == {"__type__": "update"}  # nothing sent, the box left as it was


def test_twenty_concurrent_chat_requests_all_complete(live_app):
    def one_chat(index: int) -> list[tuple[str, str]]:
        chatbot, _ = client_for(live_app.url).predict(
            f"Request {index}: what time is it ?", *CHAT_ARGS, api_name="/chat"
        )
        return message_texts(chatbot)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one_chat, range(20)))
    elapsed = time.perf_counter() - started
    print(f"20 concurrent chat requests completed in {elapsed:.1f} s")  # reported, never asserted
    assert len(results) == 20
    for index, messages in enumerate(results):
        assert messages[0] == ("user", f"Request {index}: what time is it ?")
        assert messages[1][0] == "assistant" and messages[1][1]


def test_the_page_answers_while_every_generation_slot_is_busy(tiny_model, tiny_tokenizer, tmp_path):
    """Votes, resets and the results table never wait behind generations: with both generation slots held at a
    gate, the results endpoint still answers; the held chats then finish once the gate opens."""
    from gpt2ft.votes import init_votes_db

    gate = threading.Event()
    model = served(RecordingModel(tiny_model, gate), tiny_tokenizer)
    votes_db = init_votes_db(tmp_path / "votes.sqlite")
    app = build_app(model, None, votes_db=votes_db, concurrency=2)
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    try:
        jobs = [client_for(url).submit(f"Hi {i}", *CHAT_ARGS, api_name="/chat") for i in range(3)]
        table = client_for(url).predict(api_name="/results")  # answered while the chats wait at the gate
        assert table["headers"][:3] == ["model", "opponent", "votes"]
        assert not any(job.done() for job in jobs)
        gate.set()
        for job in jobs:
            assert message_texts(job.result(timeout=120)[0])[1][0] == "assistant"
    finally:
        gate.set()
        app.close()


def test_results_name_models_briefly_with_the_full_name_on_hover(tmp_path, served_pair):
    """A model named by its full path (an earlier session's folder) is shown by its folder's name, with the path in
    the cell's title (hover); a served model keeps the page's name for it; two folders of one name are told apart
    by their parents; a Hub id stays whole; names are escaped (they come from the votes file)."""
    from gpt2ft.serve import results_rows
    from gpt2ft.votes import init_votes_db, record_vote

    tuned, base = served_pair
    db = init_votes_db(tmp_path / "votes.sqlite")
    old = "/content/drive/MyDrive/gpt2ft/runs/2025-06-01/gpt2_finetuned"
    preferred = "/content/drive/MyDrive/gpt2ft/runs/2025-06-01/gpt2_<i>&preferred"
    conversation = [{"role": "user", "content": "Hi"}]
    for model, opponent in ((preferred, old), (str(tuned), str(base)), (str(tuned), "HuggingFaceTB/SmolLM2-135M")):
        record_vote(db, conversation, "A.", "B.", model, opponent, "a", {"model": model})
    rows = results_rows(db, {str(tuned): "gpt2_finetuned", str(base): "base"})
    cells = {(row[0], row[1]) for row in rows}
    assert cells == {
        (
            '<span title="/content/drive/MyDrive/gpt2ft/runs/2025-06-01/gpt2_&lt;i&gt;&amp;preferred">'
            "gpt2_&lt;i&gt;&amp;preferred</span>",
            f'<span title="{old}">2025-06-01/<wbr>gpt2_finetuned</span>',
        ),
        (f'<span title="{tuned}">gpt2_finetuned</span>', f'<span title="{base}">base</span>'),
        (
            f'<span title="{tuned}">gpt2_finetuned</span>',
            '<span title="HuggingFaceTB/SmolLM2-135M">HuggingFaceTB/<wbr>SmolLM2-135M</span>',
        ),
    }
    assert all(row[2] == 1 and row[3] == 1 for row in rows)


def compare_and_vote(url: str, winner: str, message: str) -> tuple[list, str, str]:
    """One blind round through the API: send, vote; returns (replies shown, reveal line, db row count before)."""
    client = client_for(url)
    outputs = client.predict(message, *CHAT_ARGS, api_name="/compare")
    reply_a, reply_b = outputs[1], outputs[2]
    voted = client.predict(api_name=f"/vote_{winner}")
    reveal = next(item for item in voted if isinstance(item, str) and item.startswith("You voted"))
    return [reply_a, reply_b], reveal, message


def test_compare_is_blind_until_the_vote_and_the_vote_is_stored(live_app):
    client = client_for(live_app.url)
    outputs = client.predict("Where are you going ?", *CHAT_ARGS, api_name="/compare")
    shown_before_vote = json.dumps(outputs)
    for name in ("gpt2_finetuned", "base", live_app.tuned, live_app.base):
        assert name not in shown_before_vote  # nothing the page receives says which reply is whose
    before = len(read_votes(live_app.votes_db))
    voted = client.predict(api_name="/vote_b")
    reveal = next(item for item in voted if isinstance(item, str) and item.startswith("You voted"))
    assert "You voted **B is better**" in reveal
    rows = read_votes(live_app.votes_db)
    assert len(rows) == before + 1
    row = rows[-1]
    assert row["winner"] == "b" and {row["model_a"], row["model_b"]} == {live_app.tuned, live_app.base}
    expected_a = "gpt2_finetuned** (yours)" if row["model_a"] == live_app.tuned else "base**"
    assert f"Reply A was written by **{expected_a}" in reveal
    assert row["conversation"] == [{"role": "user", "content": "Where are you going ?"}]
    assert row["settings"]["model"] == live_app.tuned and row["settings"]["max_new_tokens"] == 12
    assert outputs[1] == (row["reply_a"] or EMPTY_REPLY) and outputs[2] == (row["reply_b"] or EMPTY_REPLY)
    # A second vote on the same replies is refused; the conversation goes on from the chosen reply.
    client.predict(api_name="/vote_a")
    assert len(read_votes(live_app.votes_db)) == before + 1
    outputs = client.predict(api_name="/continue_b")
    assert [role for role, _ in message_texts(outputs[0])] == ["user", "assistant"]
    assert message_texts(outputs[0])[1][1] == (row["reply_b"] or EMPTY_REPLY)


def test_a_vote_before_any_replies_stores_nothing(live_app):
    before = len(read_votes(live_app.votes_db))
    client_for(live_app.url).predict(api_name="/vote_tie")
    assert len(read_votes(live_app.votes_db)) == before


def test_votes_from_many_sessions_at_once_are_all_stored(live_app):
    before = len(read_votes(live_app.votes_db))
    winners = ["a", "b", "tie", "both_bad"] * 2
    with ThreadPoolExecutor(max_workers=len(winners)) as pool:
        rounds = list(
            pool.map(
                lambda args: compare_and_vote(live_app.url, *args),
                [(w, f"Session {i} says hi") for i, w in enumerate(winners)],
            )
        )
    rows = read_votes(live_app.votes_db)[before:]
    assert len(rows) == len(winners) == len(rounds)
    assert sorted(row["winner"] for row in rows) == sorted(winners)
    assert {row["conversation"][0]["content"] for row in rows} == {f"Session {i} says hi" for i in range(len(winners))}


def test_twenty_votes_sent_at_once_on_one_comparison_store_one(live_app):
    """One blind round, then twenty vote requests of the same session at once, with opposite winners: one row (the
    page's check of "already voted" alone races: every request reads the round before any has voted)."""
    client = client_for(live_app.url)
    client.predict("Is it raining outside ?", *CHAT_ARGS, api_name="/compare")
    before = len(read_votes(live_app.votes_db))
    jobs = [client.submit(api_name=f"/vote_{('a', 'b')[index % 2]}") for index in range(20)]
    for job in jobs:
        job.result(timeout=60)
    rows = read_votes(live_app.votes_db)[before:]
    assert len(rows) == 1 and rows[0]["conversation"][0]["content"] == "Is it raining outside ?"
    assert len({row["comparison"] for row in read_votes(live_app.votes_db)}) == before + 1


def test_a_vote_another_request_stored_first_is_reported_as_already_counted(tiny_model, tiny_tokenizer, tmp_path):
    from gpt2ft.votes import init_votes_db

    votes_db = init_votes_db(tmp_path / "votes.sqlite")
    page = setup_page(
        served(tiny_model, tiny_tokenizer, "m"), served(tiny_model, tiny_tokenizer, "o"), votes_db, 30, None
    )
    round_ = {
        "conversation": [{"role": "user", "content": "Hi"}],
        "replies": {"a": "Hello.", "b": "Hey."},
        "models": {"a": "m", "b": "o"},
        "settings": {"greedy": True},
        "voted": False,
        "comparison": "c1",
    }
    first = make_vote(page, "a")(round_)
    assert first[0]["voted"] and "You voted **A is better**" in first[3]
    with pytest.warns(UserWarning, match="already counted"):
        second = make_vote(page, "b")(round_)  # the same round, as a request racing the first one read it
    assert all(item == {"__type__": "update"} for item in second)  # gr.skip(): the page keeps the first reveal
    assert [row["winner"] for row in read_votes(votes_db)] == ["a"]


# --------------------------------------------------------------------------------------------------------------
# The notebook's entry point
# --------------------------------------------------------------------------------------------------------------


def test_notebook_demo_is_off_by_default(capsys, tmp_path):
    assert serve_in_notebook("gpt2_finetuned", enabled=False, votes_db=tmp_path / "v.sqlite") is None
    assert "launch_web_demo = True" in capsys.readouterr().out
    assert not (tmp_path / "v.sqlite").exists()


def test_notebook_demo_serves_the_model_already_loaded(served_pair, tmp_path):
    from gpt2ft.generate import load_for_generation

    tuned, _ = served_pair
    model, tokenizer = load_for_generation(str(tuned))
    app = serve_in_notebook(
        str(tuned),
        enabled=True,
        model=model,
        tokenizer=tokenizer,
        votes_db=tmp_path / "v.sqlite",
        share=False,
        port=free_port(),
    )
    try:
        chatbot, _ = client_for(app.local_url).predict("Hi", *CHAT_ARGS, api_name="/chat")
        assert message_texts(chatbot)[1][0] == "assistant"
        assert (tmp_path / "v.sqlite").is_file()
    finally:
        app.close()


# --------------------------------------------------------------------------------------------------------------
# `python -m gpt2ft serve`: one-line errors before anything starts, and a real start
# --------------------------------------------------------------------------------------------------------------


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_serve_refuses_a_missing_or_unreadable_model_folder(tmp_path, capsys):
    votes_db = tmp_path / "logs" / "votes.sqlite"
    assert (
        main(["serve", "--model", str(tmp_path / "missing"), "--votes-db", str(votes_db), "--port", str(free_port())])
        == 2
    )
    assert "missing" in one_line_error(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["serve", "--model", str(broken), "--votes-db", str(votes_db), "--port", str(free_port())]) == 2
    assert "config.json" in one_line_error(capsys)
    assert not votes_db.exists()  # nothing was created for a run that could not start


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The model folder does not exist either: the port is checked first, in a second.
        assert main(["serve", "--model", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert f"--port {port}" in one_line_error(capsys)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--auth", "nopassword"], "--auth"),
        (["--concurrency", "0"], "--concurrency"),
        (["--time-limit", "0"], "--time-limit"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_refuses_bad_flags(served_pair, capsys, flags, named):
    tuned, _ = served_pair
    assert main(["serve", "--model", str(tuned), *flags]) == 2
    assert named in one_line_error(capsys)


def test_serve_refuses_a_bad_comparison_model_or_votes_file(served_pair, tmp_path, capsys):
    tuned, _ = served_pair
    port = str(free_port())
    assert main(["serve", "--model", str(tuned), "--compare-with", str(tmp_path / "nope"), "--port", port]) == 2
    assert "nope" in one_line_error(capsys)
    folder_as_db = tmp_path / "a_folder"
    folder_as_db.mkdir()
    assert main(["serve", "--model", str(tuned), "--votes-db", str(folder_as_db), "--port", port]) == 2
    assert "--votes-db" in one_line_error(capsys)


def test_serve_command_starts_the_page(served_pair, tmp_path):
    """`python -m gpt2ft serve` in a subprocess: it prints its URL, the page answers, Ctrl-C (SIGINT) stops it."""
    tuned, _ = served_pair
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt2ft",
            "serve",
            "--model",
            str(tuned),
            "--port",
            str(port),
            "--votes-db",
            str(tmp_path / "votes.sqlite"),
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:  # blocks until the server prints; ends if it exits
            lines.append(line)
            if "Running on local URL" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as response:
            assert "Talk to gpt2_finetuned" in response.read().decode()
        assert (tmp_path / "votes.sqlite").is_file()
    finally:
        process.send_signal(2)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_an_unreachable_recorded_base_model_leaves_chat_without_compare(tmp_path, capsys):
    """The base recorded at training time may be out of reach (offline Hub id, a moved folder): the page still
    chats, without the Compare tab, and says why; asked for by name (--compare-with), it is an error (above)."""
    import shutil

    tuned, _ = build_served_pair(tmp_path / "pair")
    shutil.rmtree(tmp_path / "pair" / "base")
    app = start_server(str(tuned), None, tmp_path / "votes.sqlite")
    assert app is not None
    assert "no Compare tab" in capsys.readouterr().err
