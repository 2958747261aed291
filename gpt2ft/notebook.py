"""Helpers for GPT2_fine_tuning.ipynb: the few steps the notebook shows that the rest of gpt2ft has no function for.

    jupyter lab GPT2_fine_tuning.ipynb                   # or open it in Colab and run all cells
    papermill GPT2_fine_tuning.ipynb out.ipynb -p num_train_epochs 1 -p max_train_dialogs 200

The notebook's cells hold no `def` or `class`: each calls one function, from the stage modules (data, training,
evaluation, generate, charts) or from here. What lives here is notebook-only: Colab and Google Drive, turning the
parameters cell into one TrainConfig, and showing things to a learner (tables, GPU memory, charts, streamed replies).
Every function returns what it shows, so the tests can check it without a notebook.
"""

from __future__ import annotations

import gc
import platform
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
import transformers
from huggingface_hub import HfApi, get_token
from transformers import TextStreamer

from . import __version__
from .charts import CONTROL_CHART, plot_length_histogram, save_figure
from .chat_format import as_messages, describe_template, end_of_turn, template_of
from .checkpoints import complete_checkpoints
from .colab import in_colab
from .config import PREFER_OUTPUT_DIR, PreferConfig, TrainConfig, build_config, config_fields, render_flag
from .controls import controls_of
from .conversations import LABELS, roles_of, speaker_labels, turns_of
from .data import IGNORE_INDEX, token_stats
from .evaluation import cut_point, format_comparison, reply_metrics, sample_replies
from .generate import chat
from .logs import percentile
from .prefer import prefer
from .sources import is_dailydialog_folder
from .training import resume_point, score_starting_model

# Two imports wait inside the functions that need them: google.colab exists only on Colab (mount_drive), and
# IPython's display takes ~1 s to import, which the helpers' tests (plain Python, no notebook) need not pay; the
# notebook itself has it loaded already.

DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = "gpt2ft"
LENGTH_CHART = "token_lengths.png"


# --------------------------------------------------------------------------------------------------------------
# Colab, Google Drive and the run's settings
# --------------------------------------------------------------------------------------------------------------


def mount_drive(mount_point: str = DRIVE_MOUNT, folder: str = DRIVE_FOLDER) -> Path:
    """Mount Google Drive and return `MyDrive/<folder>`, where this run's model, logs and charts will go.

    A free Colab session can disconnect at any time and its disk is wiped; files on Drive survive, and training
    resumes from the last checkpoint saved there.

    Raises:
        RuntimeError: not running in Colab (Drive mounting exists only there).
    """
    if not in_colab():
        raise RuntimeError(
            "use_drive=True needs Google Colab; locally, set output_dir/logs_dir/images_dir to any folder instead"
        )
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(mount_point)
    root = Path(mount_point) / "MyDrive" / folder
    root.mkdir(parents=True, exist_ok=True)
    print(f"Google Drive mounted: the model, logs and charts go under {root}")
    return root


def resolve_paths(
    output_dir: str, logs_dir: str, images_dir: str, drive_root: str | Path | None = None
) -> dict[str, str]:
    """The run's artifact folders: relative ones go under `drive_root` when Drive is used; absolute ones stay.

    The data cache is not moved to Drive: the download takes seconds, and Drive is slow with many small files.

    Returns:
        {"output_dir", "logs_dir", "images_dir"}
    """
    paths = {"output_dir": output_dir, "logs_dir": logs_dir, "images_dir": images_dir}
    if drive_root is None:
        return {name: str(path) for name, path in paths.items()}
    return {
        name: str(Path(path) if Path(path).is_absolute() else Path(drive_root) / path) for name, path in paths.items()
    }


def make_config(
    model_name: str,
    data_source: str,
    output_dir: str,
    logs_dir: str,
    images_dir: str,
    cache_dir: str,
    num_train_epochs: float,
    drive_root: str | Path | None = None,
    **settings: Any,
) -> tuple[TrainConfig, set[str]]:
    """One TrainConfig from the notebook's parameters (the same dataclass the CLI builds from its flags), and the
    names of the settings the notebook set.

    Args:
        model_name, data_source, num_train_epochs: TrainConfig's `model`, `data` and `epochs`; the notebook uses
            the longer names because a learner meets them before knowing the config.
        drive_root: from `mount_drive`; output, logs and images then live on Google Drive.
        settings: any other TrainConfig field by its own name (max_steps, batch_size, learning_rate, seed, ...);
            None leaves a setting to gpt2ft (its default, or the T4 preset for a large model).

    Raises:
        ConfigError: a value has the wrong type or is out of range; the message names the setting.
    """
    paths = resolve_paths(output_dir, logs_dir, images_dir, drive_root)
    chosen = {name: value for name, value in settings.items() if value is not None}
    if chosen.get("condition") == "auto":
        chosen["condition"] = auto_condition(data_source)
    values = dict(model=model_name, data=data_source, cache_dir=cache_dir, epochs=num_train_epochs, **paths, **chosen)
    return build_config(**values), set(values)


def auto_condition(data_source: str) -> str:
    """The notebook's `condition = "auto"`: DailyDialog's emotion and act labels as controls when the data is
    DailyDialog (every turn carries them; a reply asked for nothing is as good as a plain run's), none otherwise."""
    path = Path(data_source).expanduser()
    dailydialog = data_source == "hub" or path.suffix == ".zip" or (path.is_dir() and is_dailydialog_folder(path))
    return "emotion,act" if dailydialog else "none"


def equivalent_command(config: TrainConfig) -> str:
    """The `python -m gpt2ft train ...` command that runs the same training outside the notebook."""
    defaults = TrainConfig()
    flags = [
        render_flag(field.name, getattr(config, field.name))
        for field in config_fields()
        if getattr(config, field.name) != getattr(defaults, field.name) and getattr(config, field.name) is not None
    ]
    return " ".join(["python -m gpt2ft train", *flags])


# --------------------------------------------------------------------------------------------------------------
# Environment and GPU memory
# --------------------------------------------------------------------------------------------------------------


def environment_report(plan: Any) -> dict[str, Any]:
    """Print and return the library versions, the device, its memory and the precision training will use
    (`plan`: training.plan_run's RunPlan, which settled them)."""
    hardware, precision, reason = plan.hardware, plan.precision, plan.precision_reason
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "gpt2ft": __version__,
        "colab": in_colab(),
        "device": hardware.device,
        "gpu": hardware.name if hardware.device == "cuda" else None,
        "gpu_memory_gb": round(hardware.memory_gb, 1) if hardware.memory_gb is not None else None,
        "compute_capability": ".".join(map(str, hardware.capability)) if hardware.capability else None,
        "cuda": torch.version.cuda,
        "precision": precision,
        "precision_reason": reason,
    }
    for key, value in report.items():
        print(f"{key:>20}: {'-' if value is None else value}")
    if hardware.device != "cuda":
        print(
            "\nNo GPU found: everything runs on the CPU, which is fine for a tiny test run but far too slow for GPT-2 "
            "on all of DailyDialog. In Colab: Runtime -> Change runtime type -> T4 GPU, then run all cells again."
        )
    return report


def gpu_memory_report(stage: str, reset_peak: bool = False, train_seconds: float | None = None) -> dict[str, Any]:
    """Print and return the GPU's memory: total, reserved now, and the peak reserved since the last reset.

    "Reserved" is what PyTorch holds from the card (what nvidia-smi counts, less the CUDA context); the peak is
    what decides whether a run fits. Call it with `reset_peak=True` before training, so the peak reported after
    training is the training's own.

    Args:
        stage: a label for the printout ("before training").
        reset_peak: start a new peak measurement after reporting.
        train_seconds: the training time, printed with the memory figures when given.

    Returns:
        {"stage", "device", "train_seconds"} plus, on a GPU, total_gb, reserved_gb, peak_reserved_gb, peak_share.
    """
    report: dict[str, Any] = {
        "stage": stage,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "train_seconds": train_seconds,
    }
    lines = [f"{stage}:"]
    if train_seconds is not None:
        lines.append(f"  training time: {train_seconds:,.1f} s ({train_seconds / 60:.1f} min)")
    if report["device"] == "cpu":
        lines.append("  no GPU: training runs on the CPU, so there is no GPU memory to report")
    else:
        # Free what nothing refers to any more (a deleted model, the finished Trainer), so "reserved now" is what
        # is really still held; the peak counter is not affected by this.
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        reserved = torch.cuda.memory_reserved()
        peak = torch.cuda.max_memory_reserved()
        report.update(
            gpu=torch.cuda.get_device_name(0),
            total_gb=total / 2**30,
            reserved_gb=reserved / 2**30,
            peak_reserved_gb=peak / 2**30,
            peak_share=peak / total,
        )
        lines += [
            f"  GPU: {report['gpu']}, {report['total_gb']:.1f} GB in total",
            f"  reserved by PyTorch now: {report['reserved_gb']:.2f} GB",
            f"  peak reserved{' during training' if train_seconds is not None else ''}: "
            f"{report['peak_reserved_gb']:.2f} GB ({report['peak_share']:.0%} of the card)",
        ]
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
    print("\n".join(lines))
    return report


# --------------------------------------------------------------------------------------------------------------
# Looking at the data
# --------------------------------------------------------------------------------------------------------------


def split_counts_table(counts: dict[str, dict[str, int]]) -> Any:
    """PreparedDialogs.counts as a table: dialogues per split in the release, removed as leakage, kept, used."""
    columns = ["release", "removed", "kept", "used"]
    return pd.DataFrame.from_dict(
        {split: {column: values.get(column) for column in columns} for split, values in counts.items()}, orient="index"
    )


def format_turns(conversation: Sequence[str | Mapping[str, Any]], roles: Sequence[str] | None = None) -> str:
    """A dialogue for reading: one turn a line, each after its role (system, user, assistant), or for dialogues
    without roles the two speakers as A and B.

    Args:
        conversation: a prepared record's messages (prepared.dialogs[split][i]["messages"]), or plain turns.
        roles: the roles of plain turns.
    """
    turns = [turn["content"] if isinstance(turn, Mapping) else turn for turn in conversation]
    if roles is None:
        roles = [(turn.get("role") or "") if isinstance(turn, Mapping) else "" for turn in conversation]
    return "\n".join(f"{label}: {turn}" for label, turn in zip(speaker_labels(roles, len(turns)), turns))


# The dialogues the notebook shows a reader (the training conversation, the sample replies) are the first ones of
# their split, in the split's order, that read well as a first example: 4 to 8 turns, none longer than 200
# characters (a context and a reply that fit on a screen), and none of the words below. DailyDialog's first test
# dialogue is someone selling drugs; a reader meeting the model should not start there. Fixed and in order, so the
# same dialogues are shown on every run and before and after training.
SHOWCASE_TURNS = (4, 8)
SHOWCASE_TURN_CHARS = 200
SHOWCASE_AVOID = frozenset(
    "drug drugs weed marijuana cocaine heroin dope ganja pot acid overdose gun guns shoot shot kill killed murder "
    "rape sex sexy naked suicide dead death die died blood".split()
)


def is_showcase_dialog(conversation: Sequence[str | Mapping[str, Any]]) -> bool:
    """True for a dialogue that passes the showcase rule (SHOWCASE_TURNS, SHOWCASE_TURN_CHARS, SHOWCASE_AVOID)."""
    turns = turns_of(conversation) if conversation and isinstance(conversation[0], Mapping) else list(conversation)
    low, high = SHOWCASE_TURNS
    if not low <= len(turns) <= high or any(len(turn) > SHOWCASE_TURN_CHARS for turn in turns):
        return False
    words = set(re.findall(r"[a-z]+", " ".join(turns).lower()))
    return not words & SHOWCASE_AVOID


def showcase_dialogs(dialogs: Any, count: int) -> Any:
    """The first `count` dialogues of a prepared split that pass the showcase rule and can be cut into a context and
    a reply (evaluation.cut_point); the first `count` that can be cut when fewer pass.

    Returns:
        The split's rows at those positions (datasets.Dataset.select), in order.
    """
    chosen: list[int] = []
    fallback: list[int] = []
    for index, messages in enumerate(dialogs["messages"]):
        if cut_point(turns_of(messages), roles_of(messages)) is None:
            continue
        if len(fallback) < count:
            fallback.append(index)
        if is_showcase_dialog(messages):
            chosen.append(index)
            if len(chosen) == count:
                break
    return dialogs.select(chosen if len(chosen) == count else fallback)


def show_example_dialog(dialogs: Any) -> list[dict[str, Any]]:
    """Print and return one conversation of a prepared split for a reader: the first that passes the showcase rule
    (showcase_dialogs), one turn a line (format_turns).

    Returns:
        Its messages (a prepared record's "messages").
    """
    messages = list(showcase_dialogs(dialogs, 1)[0]["messages"])
    print(format_turns(messages))
    return messages


def plot_token_lengths(
    lengths: Sequence[int],
    images_dir: str | Path,
    limit: int | None = None,
    title: str = "Tokens per training dialogue",
) -> Path:
    """Draw the token-length histogram, save it as `<images_dir>/token_lengths.png`, show it, and print its summary.

    Args:
        limit: the model's context, marked on the chart; longer dialogues are split into overlapping windows.

    Returns:
        The PNG's path.
    """
    path = save_figure(plot_length_histogram(lengths, title=title, limit=limit), Path(images_dir) / LENGTH_CHART)
    values = sorted(lengths)
    if values:
        median, p99 = percentile(values, 0.5), percentile(values, 0.99)  # the chart's marks
        over = sum(value > limit for value in values) if limit else 0
        print(
            f"{len(values):,} dialogues, {sum(values):,} tokens: mean {sum(values) / len(values):.1f}, "
            f"median {median}, 99th percentile {p99}, longest {values[-1]}"
            + (f"; {over} longer than the {limit}-token context" if limit else "")
        )
    show_image(path)
    return path


def show_chat_format(
    conversation: Sequence[str | Mapping[str, Any]], tokenizer: Any, roles: Sequence[str] | None = None
) -> str:
    """Print and return a dialogue as the model is trained on it: rendered by the model's chat template.

    Args:
        conversation: a prepared record's messages, or plain turns (with their `roles`).
    """
    text = tokenizer.apply_chat_template(as_messages(conversation, roles), tokenize=False)
    print(text)
    return text


def describe_tokenizer(tokenizer: Any, max_length: int) -> str:
    """Print and return the vocabulary size, the EOS token, the end-of-turn token, the chat template the run trains
    in (the model's own, or gpt2ft's) and the training window."""
    text = (
        f"vocabulary: {len(tokenizer):,} tokens; EOS: {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}); "
        f"end of turn: {end_of_turn(tokenizer)!r}; chat template: {describe_template(template_of(tokenizer))}; "
        f"context: {max_length} tokens"
    )
    print(text)
    return text


def label_table(row: dict[str, Any], tokenizer: Any, limit: int = 40) -> Any:
    """The first tokens of one training row as the model sees them, and which ones it learns to predict.

    A token with label -100 is context only: the loss ignores it. Every other token is a target: its label is the
    token itself (its own id, not the next token's), predicted from the tokens before it (the model shifts the
    labels by one inside the loss).

    Args:
        row: a tokenised row (data.tokenize_dialogs: input_ids, labels).

    Returns:
        A table with one row a token: token (as text), id, label, trained (yes/no).
    """
    rows = [
        {
            "token": repr(tokenizer.decode([token])),
            "id": token,
            "label": label,
            "trained": "no" if label == IGNORE_INDEX else "yes",
        }
        for token, label in zip(row["input_ids"][:limit], row["labels"][:limit])
    ]
    return pd.DataFrame(rows)


def token_stats_table(rows: Any) -> Any:
    """Rows, tokens and target tokens of each tokenised split (data.token_stats) as a table."""
    return pd.DataFrame.from_dict({split: token_stats(rows[split]) for split in rows}, orient="index").round(1)


# --------------------------------------------------------------------------------------------------------------
# Before and after
# --------------------------------------------------------------------------------------------------------------


def score_splits(model: Any, tokenizer: Any, rows: Any, plan: Any, label: str = "") -> dict[str, Any]:
    """The model before fine-tuning on the tokenised held-out splits, scored exactly as training evaluates them
    (training.score_starting_model, the run's own baseline), with a line a split.

    Returns:
        base_eval_* and base_test_* (loss, perplexity, tokens, bits_per_byte): pass it to evaluate_run, so
        metrics.json and the card hold it too.
    """
    scores = score_starting_model(plan, model, tokenizer, rows)
    for prefix, split in (("eval", "validation"), ("test", "test")):
        print(
            f"{split}{' ' + label if label else ''}: loss {scores[f'base_{prefix}_loss']:.4f}, perplexity "
            f"{scores[f'base_{prefix}_perplexity']:.2f}, {scores[f'base_{prefix}_bits_per_byte'] or float('nan'):.3f} "
            f"bits per byte ({scores[f'base_{prefix}_tokens']:,} target tokens in {len(rows[split]):,} rows)"
        )
    return scores


def before_after_table(before: dict[str, Any], metrics: dict[str, Any]) -> Any:
    """Validation and test loss, perplexity and bits per byte before fine-tuning (`score_splits`) and after (the
    run's metrics).

    Returns:
        A table with one row a split: each measure before and after, and how many times lower the perplexity is.
    """
    rows = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if f"base_{prefix}_loss" not in before or f"{prefix}_perplexity" not in metrics:
            continue
        after_ppl = metrics[f"{prefix}_perplexity"]
        rows[split] = {
            "loss before": round(before[f"base_{prefix}_loss"], 4),
            "loss after": round(metrics[f"{prefix}_loss"], 4),
            "perplexity before": round(before[f"base_{prefix}_perplexity"], 2),
            "perplexity after": round(after_ppl, 2),
            "times lower": round(before[f"base_{prefix}_perplexity"] / after_ppl, 2) if after_ppl else float("nan"),
            "bits/byte before": round(before.get(f"base_{prefix}_bits_per_byte") or float("nan"), 3),
            "bits/byte after": round(metrics.get(f"{prefix}_bits_per_byte") or float("nan"), 3),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def score_replies(model: Any, tokenizer: Any, dialogs: Any, samples: int, seed: int | None = 0) -> dict[str, Any]:
    """The model's replies to `samples` held-out contexts (evaluation.sample_replies) and their statistics
    (evaluation.reply_metrics). Called once before training on the base model and once after on the tuned one.

    Returns:
        reply_metrics' fields plus "records" (context, reference, reply of each sample).
    """
    records = sample_replies(model, tokenizer, dialogs, samples, seed=seed)
    return {**reply_metrics(records), "records": records}


def comparison_table(
    before: dict[str, Any], before_replies: dict[str, Any], metrics: dict[str, Any], after_replies: dict[str, Any]
) -> str:
    """Print and return the before/after table of test perplexity and reply statistics (evaluation.format_comparison).

    Both models answered the same held-out contexts with the same decoding settings; see evaluation.reply_metrics
    for what each column means.
    """
    rows = [
        {"label": "before (base)", "perplexity": before["base_test_perplexity"], **before_replies},
        {"label": "after (fine-tuned)", "perplexity": metrics["test_perplexity"], **after_replies},
    ]
    table = format_comparison(rows)
    print(table)
    return table


# --------------------------------------------------------------------------------------------------------------
# Training: resuming and charts
# --------------------------------------------------------------------------------------------------------------


def describe_resume(plan: Any, prepared: Any) -> str | None:
    """Say whether training resumes from a checkpoint of this run (left by a Colab disconnect) or starts fresh.

    Returns:
        The checkpoint training resumes from (training.resume_point), or None.

    Raises:
        TrainingError: the checkpoint belongs to a run with other settings (the message says what to do).
    """
    resume_from = resume_point(plan, prepared)
    if resume_from:
        found = complete_checkpoints(plan.checkpoint_dir)
        print(
            f"Found {len(found)} complete checkpoint(s) in {plan.checkpoint_dir}: training resumes from {resume_from} "
            "(model, optimizer, learning-rate schedule, data order and the run's totals), instead of starting over."
        )
    elif plan.config.resume == "never":
        print("resume='never': training starts from scratch.")
    else:
        print(f"No checkpoint in {plan.checkpoint_dir}: training starts from scratch.")
    return resume_from


def show_image(path: str | Path) -> None:
    """Show a PNG in the notebook's output (in a terminal, just print its path)."""
    from IPython.display import Image, display

    display(Image(filename=str(path)))


def show_charts(paths: Sequence[str | Path]) -> list[Path]:
    """Show the charts a run drew (training.publish_run's `charts`); rebuild them any time with
    `python -m gpt2ft charts`.

    Returns:
        The PNG paths.
    """
    paths = [Path(path) for path in paths]
    if not paths:
        print("No charts were written (see the messages of the publish step).")
    for path in paths:
        print(path)
        show_image(path)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Talking to the model
# --------------------------------------------------------------------------------------------------------------


def reply_output() -> str:
    """How a reply is shown where this runs: "live" in a notebook kernel (Jupyter, Colab, papermill), "tokens" in a
    terminal, "once" anywhere else (output to a file or a pipe, a test)."""
    ipython = sys.modules.get("IPython")  # never loaded outside IPython, so no import just to find out
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        return "live"
    return "tokens" if sys.stdout.isatty() else "once"


class ReplyStreamer(TextStreamer):
    """Shows a reply as it is written (not the prompt, not the end-of-turn token), after `label`, as suits the output
    (reply_output):

    - "live": one output a reply, updated in place as tokens arrive: a person at the notebook watches it grow, and
      the saved notebook (a papermill run's too) holds each reply once, not one output a token;
    - "tokens": printed token by token, as transformers' TextStreamer does, in a terminal;
    - "once": printed whole when it ends.
    """

    def __init__(self, tokenizer: Any, label: str = "", output: str | None = None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.label, self.output = label, output or reply_output()
        self.text, self.handle, self.started = "", None, False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        first, self.started = not self.started, True
        self.text += text
        if self.output == "live":
            from IPython.display import display

            bundle = {"text/plain": self.label + self.text}
            if self.handle is None:
                self.handle = display(bundle, raw=True, display_id=True)
            else:
                self.handle.update(bundle, raw=True)
        elif self.output == "tokens":
            print((self.label if first else "") + text, flush=True, end="" if not stream_end else None)
        elif stream_end:
            print(self.label + self.text, flush=True)
        if stream_end:
            self.text, self.handle, self.started = "", None, False


def make_streamer(tokenizer: Any, label: str = "") -> ReplyStreamer:
    """A ReplyStreamer: each reply shown as it is written, once in a saved notebook."""
    return ReplyStreamer(tokenizer, label)


def show_controls(model: Any, tokenizer: Any, dialogs: Any, seed: int | None = 0, **decoding: Any) -> Any:
    """One held-out context (the first the showcase rule picks) answered in each label the model takes: the seven
    emotions and the four acts, side by side.

    Returns:
        A table (field, label asked for, reply), or None for a model trained without controls.
    """
    fields = controls_of(template_of(tokenizer))
    if not fields:
        print('This model was trained without controls (condition = "none"): set condition in the parameters.')
        return None
    dialogs = showcase_dialogs(dialogs, 1)
    rows = []
    for field_name in fields:
        for label in LABELS[field_name]:
            record = sample_replies(model, tokenizer, dialogs, 1, seed=seed, controls={field_name: label}, **decoding)[
                0
            ]
            rows.append({"field": field_name, "asked for": label, "reply": record["reply"]})
    print(format_turns(record["context"], record["roles"]))
    return pd.DataFrame(rows)


def show_control_chart(paths: Sequence[str | Path]) -> Path | None:
    """Show the run's control chart (control accuracy per label beside chance), when it drew one."""
    chart = next((Path(path) for path in paths if Path(path).name == CONTROL_CHART), None)
    if chart is None:
        print("No control chart: the run was trained without controls.")
        return None
    show_image(chart)
    return chart


def show_replies(
    model: Any, tokenizer: Any, dialogs: Any, count: int, seed: int | None = None, **decoding: Any
) -> list[dict[str, Any]]:
    """The model's reply to a few held-out conversations, shown as it is written, next to the real reply
    (evaluation.sample_replies: the first half of each conversation is the context). The conversations are the
    first ones of the split that pass the showcase rule (showcase_dialogs), the same on every run.

    Returns:
        sample_replies' records.
    """

    def show_context(record: dict[str, Any]) -> None:
        print(format_turns(record["context"], record["roles"]))
        print(f"real:  {record['reference']}", flush=True)

    records = sample_replies(
        model,
        tokenizer,
        showcase_dialogs(dialogs, count),
        count,
        seed=seed,
        before_each=show_context,
        streamer=make_streamer(tokenizer, label="model: "),
        **decoding,
    )
    print()
    return records


def expects_reply(line: str) -> bool:
    """chat() answers every non-blank line except its commands (/reset, /quit)."""
    return bool(line.strip()) and line.strip() not in ("/reset", "/quit")


def echo_lines(lines: Iterable[str]) -> Iterator[str]:
    """Scripted chat input, printed as if typed."""
    for line in lines:
        print(f"you> {line}", flush=True)
        yield line


def typed_lines(prompt: str = "you> ") -> Iterator[str]:
    """Chat input typed by the user in the notebook's input box, until /quit (or the input ends)."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return
        yield line


def chat_in_notebook(
    model: Any, tokenizer: Any, lines: Sequence[str] | None = None, stream: bool = True, **decoding: Any
) -> int:
    """A multi-turn conversation through generate.chat: typed in an input box when `lines` is None, else scripted.

    Typing needs a person at the notebook, so papermill and "run all" use the scripted lines unless the notebook's
    `chat_interactive` parameter is True. `/reset` starts a new conversation, `/quit` ends it. Each reply follows
    `bot> `, shown as it is written when `stream` (ReplyStreamer), else printed when done.

    Returns:
        The number of replies.
    """
    streamer = make_streamer(tokenizer, label="bot> ") if stream else None

    def write(text: str) -> None:
        # A streamed reply is already on screen; only chat()'s own notices still need printing.
        if text == "(conversation reset)":
            print(text, flush=True)
        elif streamer is None:
            print(f"bot> {text}", flush=True)

    source = typed_lines() if lines is None else echo_lines(lines)
    return chat(model, tokenizer, source, write, streamer=streamer, **decoding)


# --------------------------------------------------------------------------------------------------------------
# Saving and sharing
# --------------------------------------------------------------------------------------------------------------


def describe_saved_model(output_dir: str | Path) -> list[dict[str, Any]]:
    """Print and return the files of the saved model folder with their sizes."""
    folder = Path(output_dir).resolve()
    files = [
        {"file": path.relative_to(folder).as_posix(), "mb": path.stat().st_size / 2**20}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    print(f"The fine-tuned model is in {folder}:")
    for entry in files:
        print(f"  {entry['file']:<28} {entry['mb']:10.2f} MB")
    print(f"  {'total':<28} {sum(entry['mb'] for entry in files):10.2f} MB")
    return files


def push_model_to_hub(output_dir: str | Path, repo_id: str | None, enabled: bool, private: bool = True) -> str | None:
    """Upload the saved model folder (not its checkpoints) to the Hugging Face Hub, if `enabled`.

    Off by default: uploading is a side effect a learner should choose. The repository is created private; make it
    public on the Hub when ready (DailyDialog's licence, CC BY-NC-SA 4.0, is non-commercial).

    Returns:
        The model's Hub URL, or None when not enabled.

    Raises:
        ValueError: enabled without a repo id.
        RuntimeError: enabled without a token.
    """
    if not enabled:
        print("push_to_hub is False: nothing was uploaded.")
        return None
    if not repo_id:
        raise ValueError("push_to_hub=True needs hub_repo_id, e.g. 'your-hf-name/gpt2-dailydialog'")

    token = get_token()  # Colab's Secrets (HF_TOKEN), the HF_TOKEN variable, or a `hf auth login`
    if not token:
        raise RuntimeError(
            "push_to_hub=True needs a Hugging Face write token: in Colab add it under Secrets (key icon) as HF_TOKEN, "
            "elsewhere set the HF_TOKEN environment variable"
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir))
    url = f"https://huggingface.co/{repo_id}"
    print(f"uploaded {output_dir} to {url}")
    return url


# --------------------------------------------------------------------------------------------------------------
# Preference tuning: learn from the votes (gpt2ft/prefer.py)
# --------------------------------------------------------------------------------------------------------------


def prefer_in_notebook(
    model_dir: str | Path,
    enabled: bool,
    data: str | None = None,
    algorithm: str = "dpo",
    output_dir: str | None = None,
    logs_dir: str | Path = "logs",
    images_dir: str | Path = "images",
    cache_dir: str = "data",
    drive_root: str | Path | None = None,
    **settings: Any,
) -> Any:
    """The notebook's optional preference tuning: `prefer.prefer` from the fine-tuned model, on the web page's votes
    or a preference dataset, into its own folders (the fine-tuning run's model, logs and charts stay).

    Args:
        model_dir: the fine-tuned model's folder (the notebook's `saved_to`).
        enabled: the `preference_tuning` parameter; False (the default) does nothing, so "Run all" and papermill
            never wait for votes that do not exist.
        data: a votes database, a preference file or folder, or "hub:OWNER/NAME"; None = the web page's votes in
            `logs_dir` (votes.sqlite).
        output_dir: where the preferred model goes (None: PreferConfig's default); on Drive when `drive_root` is set.
        logs_dir, images_dir: the notebook's folders; the run writes into their `prefer/` subfolders.
        settings: any other PreferConfig field by its own name (beta, epochs, learning_rate, method, ...); None
            leaves it to gpt2ft.

    Returns:
        runs.RunResult of prefer.prefer, or None when not enabled.

    Raises:
        DataError, ModelError, ConfigError, TrainingError: bad input, with a one-line message.
    """
    if not enabled:
        print(
            "Preference tuning off: set preference_tuning = True in the parameters cell (after votes on the web "
            "page, or with preference_data)."
        )
        return None

    paths = resolve_paths(
        output_dir or PREFER_OUTPUT_DIR, str(Path(logs_dir) / "prefer"), str(Path(images_dir) / "prefer"), drive_root
    )
    chosen = {name: value for name, value in settings.items() if value is not None}
    values = dict(
        model=str(model_dir),
        data=data or str(Path(logs_dir) / "votes.sqlite"),
        algorithm=algorithm,
        cache_dir=cache_dir,
        **paths,
        **chosen,
    )
    config = build_config(config_class=PreferConfig, **values)
    defaults = PreferConfig()
    print(
        "python -m gpt2ft prefer "
        + " ".join(
            render_flag(field.name, getattr(config, field.name))
            for field in config_fields(PreferConfig)
            if getattr(config, field.name) != getattr(defaults, field.name) and getattr(config, field.name) is not None
        )
    )
    return prefer(config, explicit=set(values))


def preference_table(result: Any) -> Any:
    """The held-out measures of a preference run (prefer_in_notebook's result) before and after, and its chart.

    Returns:
        A table with one row a measure (reward accuracy and margin, how often the model itself prefers the better
        reply, supervised validation perplexity), or None when preference tuning was off.
    """
    if result is None:
        print("Preference tuning was off: nothing to show.")
        return None

    metrics = result.metrics
    rows = {
        label: {"before": metrics.get(f"{key}_before"), "after": metrics.get(f"{key}_after")}
        for key, label in (
            ("reward_accuracy", "reward accuracy (held out)"),
            ("reward_margin", "reward margin (held out)"),
            ("logp_accuracy", "model finds the better reply likelier"),
            ("sft_perplexity", "supervised validation perplexity"),
        )
        if metrics.get(f"{key}_after") is not None
    }
    print(
        f"{metrics['algorithm'].upper()} from {metrics['started_from']} on {metrics['data_source']}: "
        f"model in {result.output_dir}"
    )
    charts = [Path(path) for path in result.published.charts if Path(path).name == "chart_prefer.png"]
    for path in charts:
        show_image(path)
    return pd.DataFrame.from_dict(rows, orient="index").round(4)
