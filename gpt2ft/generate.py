"""Replies from a fine-tuned model: prompt building, decoding defaults, and the chat loop.

    python -m gpt2ft generate --model gpt2_finetuned "Hi, how are you?"
    python -m gpt2ft chat --model gpt2_finetuned

The prompt is the conversation rendered by the model's chat template (gpt2ft's, `chat_format.CHAT_TEMPLATE`, when
the model has none): the training format, EOS, then every turn followed by EOS. The model's reply is what it writes
up to its next EOS. Only the most recent whole turns that fit the context (with room for the reply) are kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .chat_format import as_messages, render_ids, stop_token_ids, template_of
from .controls import controls_of
from .errors import ConfigError, ModelError
from .modeling import load_model_and_tokenizer, model_context

# Dialogue-friendly decoding, saved into every model's generation_config.json:
# - sampling with temperature 0.8 and nucleus top-p 0.9: varied but on-topic replies (greedy GPT-2 loops);
# - 50 new tokens is ~2.5x DailyDialog's mean turn (~14 tokens) and above its p99 turn length;
# - no repetition guard that looks at the prompt: transformers' no_repeat_ngram_size bans every n-gram already in
#   the prompt, EOS included, so a reply that ends like an earlier turn ("Thank you.<EOS>" twice) cannot end, and a
#   repetition_penalty penalises the prompt's EOS tokens the same way. gpt2ft's own replies use REPLY_NO_REPEAT_NGRAM
#   instead, which looks at the reply only (README "Decoding" has the measurements).
GENERATION_DEFAULTS: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.9,
    "top_k": 0,
    "max_new_tokens": 50,
}
# No 4-gram twice within one reply: stops verbatim loops without touching what the conversation already said.
REPLY_NO_REPEAT_NGRAM = 4


class ReplyNoRepeatNGram:
    """A logits processor that bans, at each step, the tokens that would repeat an n-gram of the reply so far
    (the tokens after `prompt_length`), never an n-gram of the prompt."""

    def __init__(self, size: int, prompt_length: int) -> None:
        self.size, self.prompt_length = size, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        reply = input_ids[:, self.prompt_length :]
        if self.size < 1 or reply.shape[1] < self.size - 1:
            return scores
        for row, tokens in enumerate(reply.tolist()):
            prefix = tuple(tokens[len(tokens) - self.size + 1 :])
            banned = [
                tokens[start + self.size - 1]
                for start in range(len(tokens) - self.size + 1)
                if tuple(tokens[start : start + self.size - 1]) == prefix
            ]
            if banned:
                scores[row, banned] = -float("inf")
        return scores


def build_generation_config(tokenizer: Any, **overrides: Any) -> Any:
    """GenerationConfig with the dialogue defaults, the template's end-of-turn token (and EOS) as the stop, and the
    tokenizer's pad and BOS (EOS for GPT-2, which has neither)."""
    stops = stop_token_ids(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return GenerationConfig(
        **{**GENERATION_DEFAULTS, **overrides},
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=pad,
        bos_token_id=bos,
    )


def keep_latest_turns(
    tokenizer: Any,
    conversation: Sequence[str | Mapping[str, Any]],
    max_prompt_tokens: int,
    controls: Mapping[str, str] | None = None,
) -> list[dict[str, str]] | None:
    """The most recent whole turns of a conversation whose rendering fits in `max_prompt_tokens`, as messages.

    A leading system message is kept while it fits; other turns are dropped oldest first, never cut in half. None
    when not even the latest turn fits on its own (build_prompt_ids then cuts it; preference data skips it).
    """
    messages = as_messages(conversation)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    for head in (system, []) if system else ([],):
        # More turns render to more tokens, so the longest suffix that fits is found by bisection: a few renders
        # (fast tokenizer passes) even for a long chat or a huge message.
        low, high = 0, len(turns)  # invariant: turns[high:] fits (the empty suffix does)
        while low < high:
            middle = (low + high) // 2
            if len(render_ids(tokenizer, head + turns[middle:], **(controls or {}))) <= max_prompt_tokens:
                high = middle
            else:
                low = middle + 1
        if high < len(turns):
            return head + turns[high:]
    return None


def build_prompt_ids(
    tokenizer: Any,
    conversation: Sequence[str | Mapping[str, Any]],
    max_prompt_tokens: int,
    controls: Mapping[str, str] | None = None,
) -> list[int]:
    """Token ids of the conversation so far, keeping the most recent whole turns that fit in `max_prompt_tokens`.

    A leading system message is kept while it fits; other turns are dropped oldest first, never cut in half. Only
    when the latest turn alone does not fit is it cut, keeping its end (the words closest to the reply) after an EOS.

    Args:
        tokenizer: the model's tokenizer.
        conversation: turns (strings) or messages, oldest first; the last one is being answered.
        max_prompt_tokens: room for the prompt (the context minus the reply's max_new_tokens).
        controls: the labels asked for the reply (controls.asked), for a model trained with them.
    """
    kept = keep_latest_turns(tokenizer, conversation, max_prompt_tokens, controls)
    if kept is not None:
        return render_ids(tokenizer, kept, **(controls or {}))
    messages = as_messages(conversation)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    last = render_ids(tokenizer, messages[len(system) :][-1:] or system, **(controls or {}))
    return [tokenizer.eos_token_id] + last[-(max_prompt_tokens - 1) :]


def check_controls(tokenizer: Any, controls: Mapping[str, str] | None) -> None:
    """A reply may be asked for in an emotion or act only from a model trained with those controls.

    Raises:
        ConfigError: naming the flag and how such a model is made.
    """
    taken = controls_of(template_of(tokenizer))
    for field in controls or {}:
        if field not in taken:
            raise ConfigError(
                f"--{field} {controls[field]}: this model was not trained with {field} controls (its template takes "
                f"{', '.join(taken) or 'none'}); train one with --condition {field}"
            )


@dataclass
class Reply:
    """A generated turn: its text, how many tokens it took (EOS not counted), and whether it ended with EOS
    (rather than running out of `max_new_tokens`)."""

    text: str
    tokens: int
    ended_with_eos: bool


def decoding_overrides(greedy: bool = False, **settings: Any) -> dict[str, Any]:
    """Per-call overrides of the saved generation config; None values are left at the saved default."""
    overrides = {key: value for key, value in settings.items() if value is not None}
    if greedy:
        overrides.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return overrides


@torch.no_grad()
def generate_reply(
    model: Any,
    tokenizer: Any,
    history: Sequence[str | Mapping[str, Any]],
    greedy: bool = False,
    seed: int | None = None,
    streamer: Any = None,
    controls: Mapping[str, str] | None = None,
    **settings: Any,
) -> Reply:
    """The model's next turn after `history`, stopping at EOS or `max_new_tokens`.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        history: turns so far, oldest first: strings (roles alternate, the last is the user's) or chat messages
            ({"role": "system" | "user" | "assistant", "content": ...}).
        greedy: deterministic decoding instead of the saved sampling defaults.
        seed: makes sampling reproducible.
        streamer: a transformers streamer (e.g. TextStreamer) to print tokens as they come.
        controls: the labels asked for ({"emotion": "happiness", "act": "question"}; controls.asked), for a model
            trained with them (`train --condition`).
        settings: overrides of the generation config (max_new_tokens, temperature, top_p, ...);
            no_repeat_ngram_size sets the reply-only guard (0 turns it off).
    """
    if not history:
        raise ValueError("history must hold at least one turn")
    check_controls(tokenizer, controls)
    overrides = decoding_overrides(greedy, **settings)
    # The reply-only guard replaces transformers' prompt-wide one (which models saved before gpt2ft 0.2 carry).
    no_repeat = overrides.pop("no_repeat_ngram_size", REPLY_NO_REPEAT_NGRAM)
    max_new_tokens = overrides.get("max_new_tokens") or getattr(model.generation_config, "max_new_tokens", None) or 50
    context = model_context(model)
    prompt = build_prompt_ids(tokenizer, history, max(2, context - max_new_tokens), controls)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    if seed is not None:
        torch.manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        eos_token_id=stops,
        pad_token_id=pad,
        streamer=streamer,
        logits_processor=LogitsProcessorList([ReplyNoRepeatNGram(no_repeat, len(prompt))]) if no_repeat else None,
        **{**overrides, "max_new_tokens": max_new_tokens, "no_repeat_ngram_size": 0},
    )
    new_tokens = output[0, len(prompt) :].tolist()
    end = next((position for position, token in enumerate(new_tokens) if token in stops), None)
    ended = end is not None
    if ended:
        new_tokens = new_tokens[:end]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return Reply(text=text, tokens=len(new_tokens), ended_with_eos=ended)


def load_for_generation(model_dir: str, device: str | None = None, flag: str = "--model") -> tuple[Any, Any]:
    """Model (in eval mode, on the GPU when there is one) and tokenizer from a saved folder or Hub id.

    Raises:
        ModelError: the model cannot be used, naming it by `flag` (the option the user typed, e.g. `--base`).
    """
    try:
        model, tokenizer = load_model_and_tokenizer(model_dir)
    except ModelError as error:
        if flag == "--model":
            raise
        raise ModelError(str(error).replace("--model", flag, 1)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def chat(
    model: Any,
    tokenizer: Any,
    lines: Iterable[str],
    write: Callable[[str], None],
    prompt: Callable[[], None] | None = None,
    reply_fn: Callable[..., Reply] = None,  # type: ignore[assignment]
    system: str | None = None,
    **decoding: Any,
) -> int:
    """Hold a conversation: each line is a user turn and gets one reply line.

    `/reset` clears the history, `/quit` (or the end of the input) leaves; blank lines are ignored. Works the
    same over a terminal and over piped stdin. `reply_fn` (default `generate_reply`) produces each reply;
    `system` starts every conversation with a system message.

    Returns:
        The number of replies given.
    """
    reply_fn = reply_fn or generate_reply
    opening = [{"role": "system", "content": system}] if system and system.strip() else []
    history: list[dict[str, str]] = list(opening)
    replies = 0
    if prompt:
        prompt()
    for raw in lines:
        line = raw.strip()
        if line == "/quit":
            break
        if line == "/reset":
            history = list(opening)
            write("(conversation reset)")
        elif line:
            history.append({"role": "user", "content": line})
            reply = reply_fn(model, tokenizer, history, **decoding)
            history.append({"role": "assistant", "content": reply.text})
            write(reply.text)
            replies += 1
        if prompt:
            prompt()
    return replies


def chat_in_terminal(model: Any, tokenizer: Any, system: str | None = None, **decoding: Any) -> int:
    """`chat` over stdin/stdout, with a `you> ` prompt only when a person is typing."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset clears the conversation, /quit leaves.")

    def show_prompt() -> None:
        print("you> ", end="", flush=True)

    def write(text: str) -> None:
        print(("bot> " if interactive else "") + text, flush=True)

    return chat(
        model, tokenizer, sys.stdin, write, prompt=show_prompt if interactive else None, system=system, **decoding
    )
