"""The model card: the README.md that train() writes into the saved model folder.

    python -m gpt2ft train ...      # writes <output-dir>/README.md (this card) next to chart_train.png

`render_model_card` turns the run's metrics, its training config and a few sample replies into Markdown with
Hub-style YAML front matter: what the model is, the data and its licence, the leakage-free split counts, the
settings, the final losses and perplexities, hardware and runtime, how to load it, and its limitations. Any
missing value is shown as "n/a", so a card can always be written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .data import DATA_LICENSE, HUB_REPO
from .logs import as_float

NA = "n/a"
DATA_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
DAILYDIALOG_PAPER = "https://aclanthology.org/I17-1099/"
SPLITS = ("train", "validation", "test")
CONTEXT_CHARS = 300  # long sample turns are cut so the card stays readable
DAILYDIALOG_BIBTEX = """@inproceedings{li-etal-2017-dailydialog,
    title = "{D}aily{D}ialog: A Manually Labelled Multi-turn Dialogue Dataset",
    author = "Li, Yanran and Su, Hui and Shen, Xiaoyu and Li, Wenjie and Cao, Ziqiang and Niu, Shuzi",
    booktitle = "Proceedings of the Eighth International Joint Conference on Natural Language Processing (Volume 1: Long Papers)",
    year = "2017",
    publisher = "Asian Federation of Natural Language Processing",
    url = "https://aclanthology.org/I17-1099",
    pages = "986--995",
}"""


# --------------------------------------------------------------------------------------------------------------
# Formatting: every formatter takes anything and answers "n/a" for what it cannot show
# --------------------------------------------------------------------------------------------------------------


def format_float(value: Any, digits: int = 4) -> str:
    """`value` with `digits` decimals ("inf" for infinity, "n/a" for missing or not a number)."""
    number = as_float(value)
    if number is None:
        return NA
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return f"{number:.{digits}f}"


def format_loss(value: Any) -> str:
    """A loss as the card shows it: 4 decimals."""
    return format_float(value, 4)


def format_perplexity(value: Any) -> str:
    """A perplexity as the card shows it: 2 decimals, thousands separated (an untrained model scores ~50,000)."""
    number = as_float(value)
    return f"{number:,.2f}" if number is not None and math.isfinite(number) else format_float(value, 2)


def format_int(value: Any) -> str:
    """A count with thousands separators: 1,360,000."""
    number = as_float(value)
    if number is None or math.isinf(number):
        return NA
    return f"{round(number):,}"


def format_short(value: Any) -> str:
    """A setting as written (5e-05, 0.01, 16, 2.5); True/False as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    number = as_float(value)
    if number is None:
        return NA if value is None or isinstance(value, (int, float)) else str(value)
    if number.is_integer() and abs(number) < 1e15:
        return f"{int(number):,}" if abs(number) >= 10_000 else str(int(number))
    return f"{number:g}"


def format_duration(seconds: Any) -> str:
    """"42.0 s", "12 min 05 s" or "2 h 03 min 10 s"."""
    number = as_float(seconds)
    if number is None or math.isinf(number) or number < 0:
        return NA
    if number < 60:
        return f"{number:.1f} s"
    total = round(number)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def md_escape(text: Any) -> str:
    """Text safe inside Markdown: one line, and no character that would turn into markup or HTML."""
    flat = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]<>|#~])", r"\\\1", flat)


def code(text: Any) -> str:
    """Inline code; backslashes are literal inside a code span, so instead of escaping, backticks are dropped."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def _yaml_string(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: safe for any model id.
    return json.dumps(value)


def is_hub_id(name: Any) -> bool:
    """True for a Hugging Face Hub model id ("gpt2", "openai-community/gpt2"), False for a local folder."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) or ".." in name:
        return False
    try:
        return not Path(name).expanduser().exists()
    except OSError:
        return True


# --------------------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------------------


def _front_matter(base_model: str) -> str:
    lines = [
        "---",
        # The code is MIT and GPT-2's weights are under OpenAI's modified MIT licence, but these weights are
        # trained on DailyDialog, whose CC BY-NC-SA 4.0 licence forbids commercial use: no single SPDX id fits.
        "license: other",
        "license_name: dailydialog-cc-by-nc-sa-4.0",
        f"license_link: {DATA_LICENSE_URL}",
        "language:",
        "- en",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",
        "- dialogue",
        "- text-generation",
        "- conversational",
        "- gpt2ft",
        "datasets:",
        f"- {HUB_REPO}",
    ]
    if is_hub_id(base_model):
        lines.append(f"base_model: {_yaml_string(base_model)}")
    lines.append("---")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers: bool = True) -> str:
    """A Markdown table; with `numbers`, every column but the first is right-aligned."""
    align = [" --- " if i == 0 or not numbers else " ---: " for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _results(metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    rows = [["train (mean over the run)", format_loss(metrics.get("train_loss")), NA, format_int(metrics.get("train_dialogs"))]]
    for name, prefix, dialogs in (("validation", "eval", "eval_dialogs"), ("test", "test", "test_dialogs")):
        rows.append([
            name,
            format_loss(metrics.get(f"{prefix}_loss")),
            format_perplexity(metrics.get(f"{prefix}_perplexity")),
            format_int(metrics.get(dialogs)),
        ])
    return "\n".join([
        "## Results",
        "",
        _table(["split", "loss", "perplexity", "dialogues"], rows),
        "",
        "Loss is the mean cross-entropy (nats) per predicted token, weighted by tokens over the whole split; "
        "perplexity = exp(loss). "
        + ("" if settings.get("keep_overlap") is True else "Validation and test hold no dialogue that also occurs in train. ")
        + "The train loss is the Trainer's average over all training steps, so it is usually higher than the loss at the end.",
        "",
        "![training](chart_train.png)",
    ])


def _data(metrics: Mapping[str, Any], training_config: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    counts = metrics.get("data_counts") or training_config.get("data_counts") or {}
    rows = []
    for split in SPLITS:
        split_counts = (counts.get(split) or {}) if isinstance(counts, Mapping) else {}
        rows.append([split] + [format_int(split_counts.get(key)) for key in ("release", "removed", "kept", "used")])
    source = training_config.get("data_source") or settings.get("data") or NA
    overlap = settings.get("keep_overlap")
    leakage = (
        "The release splits were kept as they are (`--keep-overlap`): validation and test share dialogues with "
        "train, so their losses are optimistic."
        if overlap is True
        else "The release repeats dialogues: exact duplicates inside train were dropped, and every validation and "
        "test dialogue that also occurs in train was removed, so the held-out numbers measure unseen dialogues."
    )
    return "\n".join([
        "## Data",
        "",
        f"[DailyDialog]({DAILYDIALOG_PAPER}) (Li et al., 2017): about 13,000 written English dialogues about "
        "daily life, split into train, validation and test. "
        f"**Licence: {DATA_LICENSE}** ([licence text]({DATA_LICENSE_URL})), so this model may not be used "
        "commercially, and what you derive from it must be shared under the same terms.",
        "",
        f"- Source: {code(source)}",
        f"- Text cleaning (detokenised release text): {format_short(settings.get('clean_text'))}",
        f"- Format: DialoGPT's, `<|endoftext|>turn 1<|endoftext|>turn 2<|endoftext|>...`; loss on "
        f"{'every turn' if settings.get('loss_on', 'all') == 'all' else 'every turn but the first'}",
        "",
        leakage,
        "",
        _table(["split", "in the release", "removed (leakage / duplicates)", "kept", "used in this run"], rows),
    ])


def _settings(
    metrics: Mapping[str, Any], training_config: Mapping[str, Any], settings: Mapping[str, Any], base_model: str
) -> str:
    batch = as_float(settings.get("batch_size"))
    accumulation = as_float(settings.get("gradient_accumulation_steps"))
    world = as_float(metrics.get("world_size")) or 1
    effective = format_int(batch * accumulation * world) if batch is not None and accumulation is not None else NA
    max_steps = settings.get("max_steps")
    method = metrics.get("method") or settings.get("method") or NA
    if method == "lora":
        method = (
            f"LoRA (r={format_short(settings.get('lora_r'))}, alpha={format_short(settings.get('lora_alpha'))}, "
            f"modules {settings.get('lora_targets', NA)}), merged into the saved weights"
        )
    elif method == "full":
        method = "full fine-tuning"
    rows = [
        ("base model", code(base_model) if base_model else NA),
        ("method", str(method)),
        ("trainable / total parameters",
         f"{format_int(metrics.get('trainable_parameters'))} / {format_int(metrics.get('total_parameters'))}"),
        ("epochs", f"{format_float(metrics.get('epochs'), 2)} completed ({format_short(settings.get('epochs'))} configured"
         + (f", stopped at --max-steps {format_short(max_steps)})" if (as_float(max_steps) or 0) > 0 else ")")),
        ("optimiser steps", format_int(metrics.get("steps"))),
        ("batch size per device x accumulation x devices", f"{format_short(settings.get('batch_size'))} x "
         f"{format_short(settings.get('gradient_accumulation_steps'))} x {format_int(world)} = {effective} dialogues"),
        ("batching", format_short(settings.get("batching"))),
        ("max sequence length", f"{format_int(training_config.get('max_length', metrics.get('max_length')))} tokens"),
        ("learning rate", f"{format_short(settings.get('learning_rate'))} "
         f"(warmup {format_short(settings.get('warmup_ratio'))} of the steps, then linear decay)"),
        ("weight decay", format_short(settings.get("weight_decay"))),
        ("gradient clipping", format_short(settings.get("max_grad_norm"))),
        ("optimiser", format_short(settings.get("optim"))),
        ("precision", format_short(metrics.get("precision") or training_config.get("precision") or settings.get("precision"))),
        ("seed", format_short(settings.get("seed"))),
        ("gpt2ft version", format_short(training_config.get("gpt2ft_version"))),
    ]
    return "\n".join(["## Training", "", _table(["setting", "value"], [[name, value] for name, value in rows], numbers=False)])


def _hardware(metrics: Mapping[str, Any], hardware_name: str) -> str:
    device = hardware_name or metrics.get("device") or NA
    rows = [
        ("hardware", md_escape(device)),
        ("devices", format_int(metrics.get("world_size") or 1)),
        ("training time", format_duration(metrics.get("train_runtime_s"))),
        ("tokens trained on", format_int(metrics.get("train_tokens"))),
        ("throughput", f"{format_int(metrics.get('train_tokens_per_s'))} tokens/s"),
    ]
    if metrics.get("resumed_from"):
        rows.append(("resumed from", code(metrics["resumed_from"])))
    return "\n".join(["## Hardware and runtime", "", _table(["", "value"], [[n, v] for n, v in rows], numbers=False)])


def _samples(samples: Sequence[Mapping[str, Any]]) -> str:
    lines = ["## Sample replies", ""]
    if not samples:
        return "\n".join(lines + ["No samples were generated for this run."])
    lines += ["Replies to the first turn of held-out validation dialogues, decoded greedily (the saved defaults "
              "sample, so replies in use vary):", ""]
    for number, sample in enumerate(samples, 1):
        context = sample.get("context") or []
        if isinstance(context, str):
            context = [context]
        reply = str(sample.get("reply") or "").strip()
        lines.append(f"**Dialogue {number}**")
        lines.append("")
        for turn in context:
            turn = str(turn)
            lines.append(f"- *Person A:* {md_escape(turn[:CONTEXT_CHARS] + ('...' if len(turn) > CONTEXT_CHARS else ''))}")
        lines.append(f"- *Model:* {md_escape(reply) if reply else '*(empty reply)*'}")
        if sample.get("reference"):
            lines.append(f"- *Reference (the dataset's reply):* {md_escape(sample['reference'])}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _usage(folder: str) -> str:
    folder_literal = json.dumps(folder)
    return "\n".join([
        "## How to use",
        "",
        "Prompts use the training format: `<|endoftext|>`, then every turn followed by `<|endoftext|>`; the reply is "
        "what the model writes up to its next `<|endoftext|>`. `generation_config.json` holds the decoding defaults "
        "(sampling, temperature 0.8, top-p 0.9) and stops at `<|endoftext|>`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f"folder = {folder_literal}  # this folder",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "model = AutoModelForCausalLM.from_pretrained(folder)",
        "",
        "eos = tokenizer.eos_token",
        'prompt = eos + "Hi, how are you today?" + eos',
        'inputs = tokenizer(prompt, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=50)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "",
        "# or with a pipeline",
        'chat = pipeline("text-generation", model=folder)',
        'print(chat(prompt, max_new_tokens=50, return_full_text=False)[0]["generated_text"])',
        "```",
        "",
        "With gpt2ft installed:",
        "",
        "```bash",
        f"python -m gpt2ft chat --model {folder}",
        f'python -m gpt2ft generate --model {folder} "Hi, how are you today?"',
        "```",
    ])


LIMITATIONS = """## Limitations

- **English only**, and only the register of DailyDialog: short, polite, textbook-like everyday conversations.
- **A small model.** GPT-2 has no knowledge beyond its 2019 web text and this fine-tuning; replies are often
  generic, can contradict earlier turns, and state wrong facts with confidence.
- It **may produce wrong, biased, offensive or otherwise inappropriate text**, inherited from GPT-2's web
  training data. Do not use it where such output could cause harm, and do not rely on it for advice.
- **Non-commercial only**: the training data is licensed CC BY-NC-SA 4.0, and so is what is derived from it.
- Low perplexity on DailyDialog measures how well it predicts these dialogues, not how good a conversation
  partner it is."""


def render_model_card(
    metrics: Mapping[str, Any], training_config: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], hardware_name: str = ""
) -> str:
    """The Markdown README.md of a saved model.

    Args:
        metrics: the run's metrics as train() writes them to metrics.json (train_loss, eval_loss, eval_perplexity,
            test_loss, test_perplexity, train_runtime_s, train_tokens, steps, data_counts, ...).
        training_config: training_config.json's content (gpt2ft_version, config = the TrainConfig dict,
            max_length, data_source, ...).
        samples: [{"context": [turns], "reference": str, "reply": str}] generated after training.
        hardware_name: the device trained on (falls back to metrics["device"]).

    Missing keys show as "n/a"; the card never fails to render.
    """
    metrics = metrics or {}
    training_config = training_config or {}
    settings = training_config.get("config") or {}
    if not isinstance(settings, Mapping):
        settings = {}
    base_model = str(settings.get("model") or metrics.get("model") or "")
    folder = str(settings.get("output_dir") or "gpt2_finetuned")
    if is_hub_id(base_model):
        base_text = f"[{code(base_model)}](https://huggingface.co/{base_model})"
    else:
        base_text = code(base_model) if base_model else "GPT-2"
    summary = (
        f"{base_text} fine-tuned on DailyDialog to hold short everyday conversations in English, with "
        f"gpt2ft {format_short(training_config.get('gpt2ft_version'))}. "
        f"Validation loss {format_loss(metrics.get('eval_loss'))} "
        f"(perplexity {format_perplexity(metrics.get('eval_perplexity'))}), "
        f"test loss {format_loss(metrics.get('test_loss'))} (perplexity {format_perplexity(metrics.get('test_perplexity'))})."
    )
    parts = [
        _front_matter(base_model),
        "",
        "# GPT-2 fine-tuned on DailyDialog",
        "",
        summary,
        "",
        _results(metrics, settings),
        "",
        _samples(samples or []),
        "",
        _usage(folder),
        "",
        _data(metrics, training_config, settings),
        "",
        _settings(metrics, training_config, settings, base_model),
        "",
        _hardware(metrics, hardware_name),
        "",
        LIMITATIONS,
        "",
        "## Citation",
        "",
        "The training data:",
        "",
        "```bibtex",
        DAILYDIALOG_BIBTEX,
        "```",
        "",
    ]
    return "\n".join(parts)
