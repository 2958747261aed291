"""Honest loss and perplexity: the mean negative log-likelihood per target token over a whole split.

    python -m gpt2ft eval --model gpt2_finetuned --data hub --split test

The Trainer's own evaluation averages per-batch means, which over-weights short batches; here every target token
counts once: loss = sum of token NLLs / number of target tokens, perplexity = exp(loss). Under data-parallel
training each process scores its own share of the rows and the sums are added across processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .chat_format import as_messages, template_of
from .controls import controls_for, controls_of
from .conversations import LABELS, roles_of, turns_of
from .data import DialogueCollator, iter_dump_records, tokenize_dialogs
from .errors import ConfigError
from .generate import GENERATION_DEFAULTS, REPLY_NO_REPEAT_NGRAM, generate_reply, load_for_generation
from .logs import write_jsonl
from .loss import core_model, last_hidden_states, token_nll_sum
from .modeling import autocast_context, device_precision, load_tokenizer, model_context, without_kv_cache


def perplexity(loss: float) -> float:
    """exp(loss), guarded against overflow (as run_clm.py does)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def batch_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLLs over the labelled positions of one batch, and how many there are (both on the device).

    The logits are computed a chunk of positions at a time from the model's last hidden states (loss.token_nll_sum,
    as in training): the same sum as `model(**batch).loss` times the count, without materialising every position's
    logits. Call it inside `modeling.without_kv_cache(model)` (evaluate_loss does): packed rows stay apart only
    without a KV cache.
    """
    core = core_model(model)  # adapters of a PEFT model stay in
    inputs = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "position_ids")}
    hidden = last_hidden_states(core, **inputs)
    return token_nll_sum(hidden, core.get_output_embeddings().weight, batch["labels"])


@torch.no_grad()
def evaluate_loss(
    model: Any,
    rows: Any,
    collator: Any,
    batch_size: int,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Token-weighted loss of `model` on tokenised rows (columns input_ids, labels).

    Args:
        model: a causal LM.
        rows: a tokenised split (datasets.Dataset or a list of dicts).
        collator: a DialogueCollator (its `loader` batches the rows, packed or padded).
        batch_size: dialogues per batch.
        device: where to run; defaults to the model's device.
        precision: "fp16"/"bf16" (autocast on CUDA) or "fp32": training's precision, so the numbers agree.
        rank, world_size: under data parallelism, this process scores rows rank, rank + world_size, ...; the sums
            are all-reduced so every process returns the loss of the whole split.

    Returns:
        {"loss", "perplexity", "tokens", "bits_per_byte"} with tokens = number of target tokens scored and
        bits_per_byte None for rows without target_bytes.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    whole = rows
    if world_size > 1:
        rows = rows.select(range(rank, len(rows), world_size)) if hasattr(rows, "select") else rows[rank::world_size]
    # Rows are read batch by batch (a datasets split stays memory-mapped), never copied into Python lists whole; the
    # batches come in the collator's few fixed shapes (DialogueCollator.loader), as in training.
    # A process whose share is empty (fewer rows than processes) still joins the all-reduce below.
    loader = collator.loader(rows, batch_size) if len(rows) else []
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    with autocast_context(precision, device), without_kv_cache(model):
        for batch in loader:
            batch = {
                key: value.to(device, non_blocking=True)
                for key, value in batch.items()
                if isinstance(value, torch.Tensor)
            }
            total, tokens = batch_nll(model, batch)
            nll_sum += total.double()
            count += tokens
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(nll_sum)
        torch.distributed.all_reduce(count)
    if was_training:
        model.train()
    tokens = int(count.item())
    loss = float(nll_sum.item() / tokens) if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": tokens,
        "bits_per_byte": bits_per_byte(float(nll_sum.item()), target_bytes(whole)),
    }


def target_bytes(rows: Any) -> int:
    """UTF-8 bytes of the text the rows' targets spell (data.ROW_FEATURES' target_bytes; 0 when rows lack it)."""
    if hasattr(rows, "column_names"):
        return int(sum(rows["target_bytes"][:])) if "target_bytes" in rows.column_names else 0
    return int(sum(row.get("target_bytes", 0) for row in rows))


def bits_per_byte(nll_sum: float, byte_count: int) -> float | None:
    """Bits per byte of text: the summed NLL in bits over the bytes the targets spell. Unlike a loss per token it
    does not depend on the tokenizer, so it compares models with different vocabularies (GPT-2's 50,257 tokens,
    SmolLM2's 49,152). Template tokens (end of turn) cost bits but spell no bytes, alike for every format with one
    end-of-turn token a turn."""
    return nll_sum / (math.log(2) * byte_count) if byte_count else None


def recompute_loss_from_dump(model: Any, records: Sequence[dict[str, list[int]]]) -> float:
    """Token-weighted loss from `eval --dump-tokens` records, one sequence at a time with plain `model(labels=...)`.

    An independent check of `evaluate_loss`: no padding, no packing, no collator.
    """
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for record in records:
            input_ids = torch.tensor([record["input_ids"]])
            labels = torch.tensor([record["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=input_ids, labels=labels).loss
            total += float(loss) * n
            count += n
    return total / count


def evaluate_dialogs(
    model: Any,
    tokenizer: Any,
    dialogs: Any,
    max_length: int | None = None,
    loss_on: str = "all",
    batch_size: int = 16,
    batching: str = "pack",
    dump_path: str | None = None,
    precision: str | None = None,
    labels: str = "all",
) -> dict[str, Any]:
    """Loss and perplexity of `model` on a prepared split of dialogues (data.DIALOG_FEATURES), formatted as in
    training.

    Args:
        dump_path: if given, write each scored sequence as {"input_ids", "labels"} (one JSON line each, unpadded)
            so the loss can be recomputed independently.
        precision: None = the precision training uses on the model's device (modeling.device_precision).
        labels: for a model trained with controls, the labels the turns carry: "all" (the true ones) or "none".

    Returns:
        {"dialogs", "tokens", "loss", "perplexity", "bits_per_byte"}
    """
    context = model_context(model)
    rows = tokenize_dialogs(dialogs, tokenizer, min(max_length or context, context), loss_on, labels=labels)
    if dump_path:
        write_jsonl(dump_path, list(iter_dump_records(rows)))
    device = next(model.parameters()).device
    precision = precision or device_precision(device)
    result = evaluate_loss(model, rows, DialogueCollator(tokenizer, batching), batch_size, device, precision)
    return {
        "dialogs": len(dialogs),
        "tokens": result["tokens"],
        "loss": result["loss"],
        "perplexity": result["perplexity"],
        "bits_per_byte": result.get("bits_per_byte"),
    }


# --------------------------------------------------------------------------------------------------------------
# Replies: does the model stop, vary, and avoid loops?
# --------------------------------------------------------------------------------------------------------------


def reply_words(text: str) -> list[str]:
    """Words for the n-gram metrics: lower-cased, split on whitespace (punctuation stays attached)."""
    return text.lower().split()


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): distinct n-grams over all replies / total n-grams."""
    grams = [gram for text in texts for gram in ngrams(reply_words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_repeated_ngram(text: str, n: int = 3) -> bool:
    grams = ngrams(reply_words(text), n)
    return len(grams) != len(set(grams))


def reply_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """eos_rate, mean_reply_tokens, distinct_1, distinct_2 and repeat_rate of `sample_replies` records."""
    count = len(records)
    texts = [record["reply"] for record in records]
    return {
        "samples": count,
        "eos_rate": sum(record["ended_with_eos"] for record in records) / count if count else 0.0,
        "mean_reply_tokens": sum(record["tokens"] for record in records) / count if count else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeat_rate": sum(has_repeated_ngram(text, 3) for text in texts) / count if count else 0.0,
    }


def cut_point(turns: Sequence[Any], roles: Sequence[str] | None = None) -> int | None:
    """Where a held-out dialogue is cut: its turns before the cut are the context, the turn at the cut is the
    reference reply. Deterministic, so every model is asked the same questions.

    Without roles: the first half of the turns (at least one). With roles: the first assistant turn from the middle
    on (else the last assistant turn), so the model is always asked for the assistant's turn; None when there is no
    assistant turn after a context.
    """
    middle = max(1, len(turns) // 2)
    if not roles or not any(roles):
        return middle if len(turns) >= 2 else None
    assistant = [index for index, role in enumerate(roles) if role == "assistant" and index >= 1]
    later = [index for index in assistant if index >= middle]
    return later[0] if later else (assistant[-1] if assistant else None)


def sample_replies(
    model: Any,
    tokenizer: Any,
    dialogs: Any,
    count: int,
    greedy: bool = False,
    seed: int | None = 0,
    before_each: Callable[[dict[str, Any]], None] | None = None,
    streamer: Any = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """The model's next turn for the first `count` held-out dialogues (a prepared split: data.DIALOG_FEATURES) that
    can be cut (`cut_point`): the one way gpt2ft samples replies (the model card, the notebook, `eval --samples`
    and `compare` all use it).

    The context goes to the model as chat messages with its roles (a system message stays the first turn), with the
    same decoding settings for every model. Sampling is seeded once, so a run is reproducible.

    Args:
        before_each: called with each record (context and reference, no reply yet) before its reply is generated,
            e.g. to print the context ahead of a streamed reply.
        streamer: a transformers streamer that shows each reply as it is written.
        settings: decoding overrides (greedy, max_new_tokens, temperature, ...), see generate.generate_reply.

    Returns:
        [{"context", "roles", "reference", "reply", "ended_with_eos", "tokens"}]
    """
    if seed is not None:
        torch.manual_seed(seed)
    records: list[dict[str, Any]] = []
    for messages in dialogs["messages"]:
        if len(records) >= count:
            break
        turns = turns_of(messages)
        cut = cut_point(turns, roles_of(messages))
        if cut is None:
            continue
        context = as_messages(messages[:cut])  # plain turns: the last one is the user's
        record: dict[str, Any] = {
            "context": turns[:cut],
            "roles": roles_of(messages[:cut]),  # as the data has them: "" for plain turns (speakers A and B)
            "reference": turns[cut],
        }
        if before_each is not None:
            before_each(record)
        reply = generate_reply(model, tokenizer, context, greedy=greedy, streamer=streamer, **settings)
        record.update(reply=reply.text, ended_with_eos=reply.ended_with_eos, tokens=reply.tokens)
        records.append(record)
    return records


def evaluate_replies(
    model: Any, tokenizer: Any, dialogs: Any, samples: int, samples_out: str | None = None, **decoding: Any
) -> dict[str, float]:
    """`sample_replies` for `samples` dialogues, measured by `reply_metrics`; the records go to `samples_out`."""
    records = sample_replies(model, tokenizer, dialogs, samples, **decoding)
    if samples_out:
        write_jsonl(samples_out, records)
    return reply_metrics(records)


def comparison_decoding(greedy: bool = False, seed: int | None = None, **settings: Any) -> dict[str, Any]:
    """One explicit set of decoding settings for every model of a comparison: gpt2ft's dialogue defaults
    (GENERATION_DEFAULTS and the reply-only no-repeat guard) with the command's own settings over them, and a seed,
    so no model falls back on its own saved generation config (a base model's is often greedy) and every model's
    sampling starts from the same random state.

    Returns:
        generate_reply's keyword arguments: greedy, seed, controls and every generation setting, none left unset.
    """
    controls = settings.pop("controls", None)
    explicit: dict[str, Any] = {
        **GENERATION_DEFAULTS,
        "no_repeat_ngram_size": REPLY_NO_REPEAT_NGRAM,
        "repetition_penalty": 1.0,
    }
    explicit.update({key: value for key, value in settings.items() if value is not None})
    if greedy:
        explicit.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return {"greedy": greedy, "seed": 0 if seed is None else seed, "controls": controls, **explicit}


def describe_decoding(decoding: dict[str, Any]) -> str:
    """The one line a comparison prints about how every model was decoded."""
    shown = {key: value for key, value in decoding.items() if value is not None and key not in ("greedy", "controls")}
    line = "decoding (every model): " + ", ".join(f"{key}={value}" for key, value in shown.items())
    controls = decoding.get("controls")
    return line + (f"; asked for {', '.join(f'{k}={v}' for k, v in controls.items())}" if controls else "")


def compare_models(
    models: dict[str, str],
    dialogs: Any,
    samples: int = 50,
    loss_on: str = "all",
    max_length: int | None = None,
    flags: dict[str, str] | None = None,
    **decoding: Any,
) -> list[dict[str, Any]]:
    """Perplexity and reply metrics for each model on the same dialogues with the same decoding settings
    (comparison_decoding makes them explicit). Controls asked for (`controls`) go to each model whose template takes
    them; a model trained without them answers unasked (its row says which it got).

    Args:
        models: label -> model folder or Hub id, e.g. {"base": "gpt2", "fine-tuned": "gpt2_finetuned"}.
        flags: label -> the flag that named the model (`--base`), for error messages.
        decoding: the same for every model; its `controls` (the labels asked for, controls.asked) go to each model
            as far as its template takes them (a plain base model beside a conditioned one is asked for nothing).

    Returns:
        One row a model: label, model, perplexity, loss, eos_rate, distinct_1, distinct_2, mean_reply_tokens,
        repeat_rate; with controls asked for, also `controls`, the labels that model was given ("none" for none).

    Raises:
        ConfigError: a label asked for that no model's template takes (checked before any model is scored).
        ModelError: a model cannot be loaded, naming the flag that named it.
    """
    controls = dict(decoding.pop("controls", None) or {})
    if controls:
        check_some_model_takes(models, controls)
    rows = []
    for label, name in models.items():
        model, tokenizer = load_for_generation(name, flag=(flags or {}).get(label, "--model"))
        row: dict[str, Any] = {"label": label, "model": name}
        scored = evaluate_dialogs(model, tokenizer, dialogs, max_length=max_length, loss_on=loss_on)
        row.update(loss=scored["loss"], perplexity=scored["perplexity"])
        given = controls_for(tokenizer, controls)
        if controls:
            row["controls"] = "; ".join(f"{field}: {value}" for field, value in given.items()) or "none"
        if samples:
            row.update(evaluate_replies(model, tokenizer, dialogs, samples, controls=given or None, **decoding))
        rows.append(row)
        del model
    return rows


def check_some_model_takes(models: dict[str, str], controls: dict[str, str]) -> None:
    """Each label asked for of a comparison is read by at least one of its models (their tokenizers only are loaded).

    Raises:
        ConfigError: naming the flag, the models and how such a model is made.
    """
    taken = {field for name in models.values() for field in controls_of(template_of(load_tokenizer(name)))}
    for field, value in controls.items():
        if field not in taken:
            raise ConfigError(
                f"--{field} {value}: none of {', '.join(models.values())} was trained with {field} controls; train "
                f"one with --condition {field}"
            )


COMPARISON_COLUMNS = (
    ("label", "model", "{}"),
    ("controls", "controls", "{}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("eos_rate", "eos_rate", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("mean_reply_tokens", "mean reply tokens", "{:.1f}"),
    ("repeat_rate", "repeat rate", "{:.2f}"),
)


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `compare_models` rows (one line per model)."""
    columns = [column for column in COMPARISON_COLUMNS if any(column[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row else "n/a" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Controls: are the replies in the emotion and act asked for? (controls.py; judged by judge.py)
# --------------------------------------------------------------------------------------------------------------


def evaluate_control(
    model: Any, tokenizer: Any, judge: Any, dialogs: Any, contexts: int, seed: int | None = 0, **decoding: Any
) -> dict[str, Any]:
    """Control accuracy: on the first `contexts` held-out contexts (sample_replies' cut), one reply per label of
    every field the model takes (each label asked for equally often, never the split's own skewed mix), classified
    by the judge; beside it the same model asked for nothing (how often the judge finds each label by chance) and
    the random rate (1 / labels).

    Returns:
        {"contexts", "fields": {field: {"accuracy": {label: share}, "macro_accuracy", "chance": {label: share},
        "macro_chance", "random", "eos_rate", "replies"}}, "eos_rate_unconditioned", "examples"}
    """
    fields = [field for field in controls_of(template_of(tokenizer)) if field in judge.classifiers]
    plain = sample_replies(model, tokenizer, dialogs, contexts, seed=seed, **decoding)
    result: dict[str, Any] = {
        "contexts": len(plain),
        "fields": {},
        "eos_rate_unconditioned": reply_metrics(plain)["eos_rate"],
        "examples": [],
    }
    for field in fields:
        labels = LABELS[field]
        found = judge.predict(field, [record["reply"] for record in plain])
        accuracy, chance, ended = {}, {}, []
        for label in labels:
            asked = sample_replies(model, tokenizer, dialogs, contexts, seed=seed, controls={field: label}, **decoding)
            predicted = judge.predict(field, [record["reply"] for record in asked])
            accuracy[label] = sum(p == label for p in predicted) / len(predicted) if predicted else None
            chance[label] = sum(p == label for p in found) / len(found) if found else None
            ended += [record["ended_with_eos"] for record in asked]
            if asked:
                result["examples"].append(
                    {"asked": {field: label}, "context": asked[0]["context"][-1], "reply": asked[0]["reply"]}
                )
        result["fields"][field] = {
            "accuracy": accuracy,
            "macro_accuracy": mean_of(accuracy.values()),
            "chance": chance,
            "macro_chance": mean_of(chance.values()),
            "random": 1 / len(labels),
            "eos_rate": sum(ended) / len(ended) if ended else None,
            "replies": len(ended),
        }
    return result


def control_report(
    model: Any,
    tokenizer: Any,
    judge: Any,
    dialogs: Any,
    contexts: int,
    max_length: int | None = None,
    loss_on: str = "all",
    **decoding: Any,
) -> dict[str, Any]:
    """`eval --control`: control accuracy (evaluate_control), the judge's own scores, and whether the replies still
    fit their context: the split's perplexity with its true labels and with none asked for."""
    if not controls_of(template_of(tokenizer)):
        raise ConfigError("--control: this model was not trained with controls (train one with --condition)")
    decoding.pop("controls", None)  # every label is asked for in turn
    result = evaluate_control(model, tokenizer, judge, dialogs, contexts, **decoding)
    for labels in ("all", "none"):
        scored = evaluate_dialogs(model, tokenizer, dialogs, max_length, loss_on, labels=labels)
        result[f"perplexity_{'labelled' if labels == 'all' else 'unlabelled'}"] = scored["perplexity"]
    return {**result, "judge": judge.scores}


def mean_of(values: Any) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None
