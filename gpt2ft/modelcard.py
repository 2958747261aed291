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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from .conversations import speaker_labels
from .logs import as_float
from .sources import DATA_LICENSE, HUB_REPO

NA = "n/a"
DATA_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
DAILYDIALOG_PAPER = "https://aclanthology.org/I17-1099/"
SPLITS = ("train", "validation", "test")
CONTEXT_CHARS = 300  # long sample turns are cut so the card stays readable
DAILYDIALOG_BIBTEX = (
    """@inproceedings{li-etal-2017-dailydialog,
    title = "{D}aily{D}ialog: A Manually Labelled Multi-turn Dialogue Dataset",
    author = "Li, Yanran and Su, Hui and Shen, Xiaoyu and Li, Wenjie and Cao, Ziqiang and Niu, Shuzi",
    booktitle = "Proceedings of the Eighth International Joint Conference on Natural Language Processing """
    """(Volume 1: Long Papers)",
    year = "2017",
    publisher = "Asian Federation of Natural Language Processing",
    url = "https://aclanthology.org/I17-1099",
    pages = "986--995",
}"""
)


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
    """ "42.0 s", "12 min 05 s" or "2 h 03 min 10 s"."""
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


GPT2_TITLES = {"gpt2": "GPT-2", "gpt2-medium": "GPT-2 medium", "gpt2-large": "GPT-2 large", "gpt2-xl": "GPT-2 XL"}


def model_title(base_model: Any) -> str:
    """The starting model as the card's title names it: GPT-2's sizes by name, others by their id's last part."""
    name = Path(str(base_model)).name
    return GPT2_TITLES.get(name.removeprefix("openai-community/"), name or "GPT-2")


def _controls(metrics: Mapping[str, Any]) -> str:
    """The card's Controls section: control accuracy per label beside chance and random, the judge's own scores,
    and how the model does when asked for nothing."""
    control = metrics["control"]
    lines = [
        "## Controls: replies in the emotion and act asked for",
        "",
        f"Trained with `--condition {','.join(control['fields'])}`: each turn's label sits in front of its text as an "
        "input, so a reply can be asked for in a label (`apply_chat_template(messages, add_generation_prompt=True, "
        'emotion="happiness")`). On '
        f"{format_int(control.get('contexts'))} held-out test contexts the model was asked for every label in turn; "
        "gpt2ft's judge (text classifiers trained on DailyDialog's training turns, saved in `judge/`) says which label "
        "each reply is in. *Chance* is how often the judge finds that label in replies asked for nothing.",
        "",
    ]
    for name, result in control["fields"].items():
        rows = [
            [label, format_float(result["accuracy"][label], 2), format_float(result["chance"].get(label), 2)]
            for label in result["accuracy"]
        ]
        rows.append(["**macro**", format_float(result["macro_accuracy"], 2), format_float(result["macro_chance"], 2)])
        judge = (control.get("judge") or {}).get(name) or {}
        lines += [
            f"### {name.capitalize()} (random: {format_float(result['random'], 2)})",
            "",
            _table(["label asked for", "control accuracy", "chance"], rows),
            "",
            f"The judge of {name} on {format_int(judge.get('turns'))} test turns: accuracy "
            f"{format_float(judge.get('accuracy'), 2)}, macro-F1 {format_float(judge.get('macro_f1'), 2)}; its "
            "figures are only as good as it is.",
            "",
        ]
    if metrics.get("eval_perplexity_unlabelled") is not None:
        lines.append(
            f"Asked for nothing, the model's validation perplexity is "
            f"{format_perplexity(metrics['eval_perplexity_unlabelled'])} (with the true labels: "
            f"{format_perplexity(metrics.get('eval_perplexity'))})."
        )
    lines += ["", "![control](chart_control.png)"]
    return "\n".join(lines)


def _front_matter(base_model: str, metrics: Mapping[str, Any], data: DataFacts) -> str:
    """The Hub's YAML metadata, built with huggingface_hub's ModelCardData: licence, tags, data, base model, and the
    held-out perplexities as model-index eval results (what the Hub shows as the model's scores)."""
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=HUB_REPO,
            dataset_name=data.name,
            dataset_split=split,
            metric_type="perplexity",
            metric_name=f"{split} perplexity",
            metric_value=round(value, 4),
        )
        for split, key in (("validation", "eval_perplexity"), ("test", "test_perplexity"))
        if (value := as_float(metrics.get(key))) is not None and math.isfinite(value)
    ]
    card_data = ModelCardData(
        # The code is MIT and GPT-2's weights are under OpenAI's modified MIT licence, but these weights are
        # trained on DailyDialog, whose CC BY-NC-SA 4.0 licence forbids commercial use: no single SPDX id fits.
        # For other data gpt2ft cannot know the licence: "other", until the owner sets it.
        license="other",
        license_name="dailydialog-cc-by-nc-sa-4.0" if data.is_dailydialog else "see-the-training-data",
        license_link=DATA_LICENSE_URL if data.is_dailydialog else None,
        language=["en"] if data.is_dailydialog else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "dialogue", "text-generation", "conversational", "gpt2ft"],
        datasets=[data.hub_id] if data.hub_id else None,
        base_model=base_model if is_hub_id(base_model) else None,
        model_name="gpt2ft" if results else None,
        eval_results=results or None,
    )
    for result in card_data.eval_results or []:
        result.dataset_type, result.dataset_name = data.hub_id or data.source, data.name
    return "---\n" + card_data.to_yaml() + "\n---"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numbers: bool = True) -> str:
    """A Markdown table; with `numbers`, every column but the first is right-aligned."""
    align = [" --- " if i == 0 or not numbers else " ---: " for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _unchanged_warning(metrics: Mapping[str, Any]) -> list[str]:
    """A warning for a model whose weights equal its starting model's (metrics' weights_changed: false)."""
    if metrics.get("weights_changed", True) is not False:
        return []
    return [
        f"> **Warning:** the saved weights equal the starting model's: after {format_int(metrics.get('steps'))} "
        "steps no weight had moved measurably, so this model answers exactly as the one it started from. A higher "
        "learning rate, more epochs or more data would change that.",
        "",
    ]


def _results(metrics: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    rows = [
        [
            "train (mean over the run)",
            format_loss(metrics.get("train_loss")),
            NA,
            format_int(metrics.get("train_dialogs")),
        ]
    ]
    rows[0].insert(3, NA)
    for name, prefix, dialogs in (("validation", "eval", "eval_dialogs"), ("test", "test", "test_dialogs")):
        for label, key in (("the starting model", f"base_{prefix}"), ("fine-tuned", prefix)):
            if metrics.get(f"{key}_loss") is None:
                continue
            rows.append(
                [
                    f"{name}, {label}" if metrics.get(f"base_{prefix}_loss") is not None else name,
                    format_loss(metrics.get(f"{key}_loss")),
                    format_perplexity(metrics.get(f"{key}_perplexity")),
                    format_float(metrics.get(f"{key}_bits_per_byte"), 3),
                    format_int(metrics.get(dialogs)),
                ]
            )
    return "\n".join(
        [
            "## Results",
            "",
            *_unchanged_warning(metrics),
            _table(["split", "loss", "perplexity", "bits per byte", "dialogues"], rows),
            "",
            "Loss is the mean cross-entropy (nats) per predicted token, weighted by tokens over the whole split; "
            "perplexity = exp(loss); bits per byte is the same cross-entropy in bits over the bytes of the text "
            "predicted, which compares models with different tokenizers. The starting model is scored on the same "
            "held-out dialogues, in the same format, before the first step. "
            + (
                ""
                if settings.get("keep_overlap") is True
                else "Validation and test hold no dialogue that also occurs in train. "
            )
            + "The train loss is the Trainer's average over all training steps, so it is usually higher than the loss "
            "at the end.",
            "",
            "![training](chart_train.png)",
        ]
    )


@dataclass
class DataFacts:
    """What the card says about the training data, from training_config.json."""

    source: str
    is_dailydialog: bool
    has_roles: bool
    loss_on: str

    @property
    def name(self) -> str:
        return "DailyDialog" if self.is_dailydialog else Path(self.source).name or self.source

    @property
    def hub_id(self) -> str | None:
        if self.is_dailydialog:
            return HUB_REPO
        return self.source[len("hub:") :].split("@")[0].split(":")[0] if self.source.startswith("hub:") else None


def data_facts(training_config: Mapping[str, Any], settings: Mapping[str, Any]) -> DataFacts:
    return DataFacts(
        source=str(training_config.get("data_source") or settings.get("data") or NA),
        is_dailydialog=training_config.get("data_is_dailydialog", True) is not False,  # cards before other sources
        has_roles=bool(training_config.get("has_roles", False)),
        loss_on=str(training_config.get("loss_on") or settings.get("loss_on") or "all"),
    )


LOSS_ON_TEXT = {
    "all": "every turn",
    "responses": "every turn but the first",
    "assistant": "the assistant's turns (system and user turns are context only)",
}


def _data(
    metrics: Mapping[str, Any], training_config: Mapping[str, Any], settings: Mapping[str, Any], data: DataFacts
) -> str:
    counts = metrics.get("data_counts") or training_config.get("data_counts") or {}
    rows = []
    for split in SPLITS:
        split_counts = (counts.get(split) or {}) if isinstance(counts, Mapping) else {}
        rows.append([split] + [format_int(split_counts.get(key)) for key in ("release", "removed", "kept", "used")])
    overlap = settings.get("keep_overlap")
    leakage = (
        "The splits were kept as they are (`--keep-overlap`): validation and test may share dialogues with "
        "train, so their losses may be optimistic."
        if overlap is True
        else "Exact duplicates inside train were dropped, and every validation and test dialogue that also occurs in "
        "train was removed, so the held-out numbers measure unseen dialogues."
    )
    if data.is_dailydialog:
        about = (
            f"[DailyDialog]({DAILYDIALOG_PAPER}) (Li et al., 2017): about 13,000 written English dialogues about "
            "daily life, split into train, validation and test. "
            f"**Licence: {DATA_LICENSE}** ([licence text]({DATA_LICENSE_URL})), so this model may not be used "
            "commercially, and what you derive from it must be shared under the same terms."
        )
    else:
        about = (
            f"Conversations from {code(data.source)}"
            + (" with roles (system, user, assistant)" if data.has_roles else "")
            + ". Splits the source did not have were held out from train by a hash of each conversation, so they are "
            "the same on every run. **Licence: that of the training data**: check it before you share this model."
        )
    return "\n".join(
        [
            "## Data",
            "",
            about,
            "",
            f"- Source: {code(data.source)}",
            f"- Text cleaning (detokenised text): {cleaning_text(settings.get('clean_text'), data.is_dailydialog)}",
            f"- Format: {format_text(metrics.get('chat_template'))}; loss on "
            f"{LOSS_ON_TEXT.get(data.loss_on, data.loss_on)}",
            "",
            leakage,
            "",
            _table(["split", "in the source", "removed (leakage / duplicates)", "kept", "used in this run"], rows),
        ]
    )


def cleaning_text(clean_text: Any, is_dailydialog: bool) -> str:
    """What the cleaning step did: `--clean-text` unset cleans DailyDialog's pre-tokenised text and nothing else."""
    ran = clean_text if clean_text is not None else is_dailydialog
    how = (
        ""
        if clean_text is not None
        else (" (DailyDialog's default)" if is_dailydialog else " (the default for own data)")
    )
    return ("yes" if ran else "no") + how


def format_text(template: Any) -> str:
    """The training format, as the card says it: gpt2ft's (DialoGPT's) or the model's own chat template."""
    if not template or str(template).startswith("gpt2ft"):
        return (
            "gpt2ft's (DialoGPT's), `<|endoftext|>turn 1<|endoftext|>turn 2<|endoftext|>...` (a system message is the "
            "first turn), saved as the model's chat template"
        )
    return f"{md_escape(template)} chat template, kept as it came, so training and chatting agree"


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
        (
            "trainable / total parameters",
            f"{format_int(metrics.get('trainable_parameters'))} / {format_int(metrics.get('total_parameters'))}",
        ),
        (
            "epochs",
            f"{format_float(metrics.get('epochs'), 2)} completed ({format_short(settings.get('epochs'))} configured"
            + (f", stopped at --max-steps {format_short(max_steps)})" if (as_float(max_steps) or 0) > 0 else ")"),
        ),
        ("optimiser steps", format_int(metrics.get("steps"))),
        (
            "batch size per device x accumulation x devices",
            f"{format_short(settings.get('batch_size'))} x "
            f"{format_short(settings.get('gradient_accumulation_steps'))} x {format_int(world)} = "
            f"{effective} dialogues",
        ),
        ("batching", format_short(settings.get("batching"))),
        ("max sequence length", f"{format_int(training_config.get('max_length', metrics.get('max_length')))} tokens"),
        (
            "learning rate",
            f"{format_short(settings.get('learning_rate'))} "
            f"(warmup {format_short(settings.get('warmup_ratio'))} of the steps, then linear decay)",
        ),
        ("weight decay", format_short(settings.get("weight_decay"))),
        ("gradient clipping", format_short(settings.get("max_grad_norm"))),
        ("optimiser", format_short(settings.get("optim"))),
        (
            "precision",
            format_short(metrics.get("precision") or training_config.get("precision") or settings.get("precision")),
        ),
        ("seed", format_short(settings.get("seed"))),
        ("gpt2ft version", format_short(training_config.get("gpt2ft_version"))),
    ]
    return "\n".join(
        ["## Training", "", _table(["setting", "value"], [[name, value] for name, value in rows], numbers=False)]
    )


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
    lines += [
        "The model's next turn in held-out validation dialogues (the first half of each is the context; with roles, "
        "the model answers an assistant turn), decoded greedily (the saved defaults sample, so replies in use "
        "vary):",
        "",
    ]
    for number, sample in enumerate(samples, 1):
        context = sample.get("context") or []
        if isinstance(context, str):
            context = [context]
        # Named as the notebook names them: by role where the data has roles, else speakers A and B.
        turns = [str(turn) for turn in context]
        labels = speaker_labels(list(sample.get("roles") or []), len(turns))
        reply = str(sample.get("reply") or "").strip()
        lines.append(f"**Dialogue {number}**")
        lines.append("")
        for label, turn in zip(labels, turns):
            shown = turn[:CONTEXT_CHARS] + ("..." if len(turn) > CONTEXT_CHARS else "")
            lines.append(f"- *{label.capitalize()}:* {md_escape(shown)}")
        lines.append(f"- *Model:* {md_escape(reply) if reply else '*(empty reply)*'}")
        if sample.get("reference"):
            lines.append(f"- *Reference (the dataset's reply):* {md_escape(sample['reference'])}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _usage(folder: str) -> str:
    folder_literal = json.dumps(folder)
    return "\n".join(
        [
            "## How to use",
            "",
            "The tokenizer carries a chat template with the training format (`<|endoftext|>`, then every turn "
            "followed by `<|endoftext|>`), so a list of chat messages is all a pipeline needs; the reply is what the "
            "model writes up to its next `<|endoftext|>`. `generation_config.json` holds the decoding defaults "
            "(sampling, temperature 0.8, top-p 0.9) and stops at `<|endoftext|>`.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
            "",
            f"folder = {folder_literal}  # this folder",
            'messages = [{"role": "user", "content": "Hi, how are you today?"}]',
            "",
            'chat = pipeline("text-generation", model=folder)',
            'print(chat(messages, max_new_tokens=50)[0]["generated_text"][-1]["content"])',
            "",
            "# or step by step",
            "tokenizer = AutoTokenizer.from_pretrained(folder)",
            "model = AutoModelForCausalLM.from_pretrained(folder)",
            "inputs = tokenizer.apply_chat_template("
            'messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
            "output = model.generate(**inputs, max_new_tokens=50)",
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
            "",
            "With gpt2ft installed:",
            "",
            "```bash",
            f"python -m gpt2ft chat --model {folder}",
            f'python -m gpt2ft generate --model {folder} "Hi, how are you today?"',
            f"python -m gpt2ft serve --model {folder}      # a chat page in the browser",
            "```",
        ]
    )


LIMITATIONS = """## Limitations

- **English only**, and only the register of DailyDialog: short, polite, textbook-like everyday conversations.
- **A small model.** GPT-2 has no knowledge beyond its 2019 web text and this fine-tuning; replies are often
  generic, can contradict earlier turns, and state wrong facts with confidence.
- It **may produce wrong, biased, offensive or otherwise inappropriate text**, inherited from GPT-2's web
  training data. Do not use it where such output could cause harm, and do not rely on it for advice.
- **Non-commercial only**: the training data is licensed CC BY-NC-SA 4.0, and so is what is derived from it.
- Low perplexity on DailyDialog measures how well it predicts these dialogues, not how good a conversation
  partner it is."""

GENERIC_LIMITATIONS = """## Limitations

- **A small model**, in the register of its training conversations only. GPT-2 has no knowledge beyond its 2019 web
  text and this fine-tuning; replies can contradict earlier turns and state wrong facts with confidence.
- It **may produce wrong, biased, offensive or otherwise inappropriate text**, from GPT-2's web training data or
  from the fine-tuning data. Do not use it where such output could cause harm, and do not rely on it for advice.
- A system message is only the first turn of the conversation: GPT-2 was not trained to follow instructions.
- Low perplexity on held-out conversations measures how well it predicts them, not how good a conversation partner
  it is."""


def render_model_card(
    metrics: Mapping[str, Any],
    training_config: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    hardware_name: str = "",
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
    data = data_facts(training_config, settings)
    if is_hub_id(base_model):
        base_text = f"[{code(base_model)}](https://huggingface.co/{base_model})"
    else:
        base_text = code(base_model) if base_model else "GPT-2"
    summary = (
        f"{base_text} fine-tuned on "
        f"{'DailyDialog to hold short everyday conversations in English' if data.is_dailydialog else code(data.source)}"
        f", with gpt2ft {format_short(training_config.get('gpt2ft_version'))}. "
        f"Validation loss {format_loss(metrics.get('eval_loss'))} "
        f"(perplexity {format_perplexity(metrics.get('eval_perplexity'))}), "
        f"test loss {format_loss(metrics.get('test_loss'))} "
        f"(perplexity {format_perplexity(metrics.get('test_perplexity'))})."
    )
    parts = [
        _front_matter(base_model, metrics, data),
        "",
        f"# {model_title(base_model)} fine-tuned on {data.name}",
        "",
        summary,
        "",
        _results(metrics, settings),
        "",
        *([_controls(metrics), ""] if metrics.get("control") else []),
        _samples(samples or []),
        "",
        _usage(folder),
        "",
        _data(metrics, training_config, settings, data),
        "",
        _settings(metrics, training_config, settings, base_model),
        "",
        _hardware(metrics, hardware_name),
        "",
        LIMITATIONS if data.is_dailydialog else GENERIC_LIMITATIONS,
        "",
        *(
            ["## Citation", "", "The training data:", "", "```bibtex", DAILYDIALOG_BIBTEX, "```", ""]
            if data.is_dailydialog
            else []
        ),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# The card of a preference-tuned model (python -m gpt2ft prefer)
# --------------------------------------------------------------------------------------------------------------

ALGORITHM_TEXT = {
    "dpo": "DPO (Direct Preference Optimization, Rafailov et al., 2023): pairs of a better and a worse reply to the "
    "same conversation",
    "kto": "KTO (Kahneman-Tversky Optimization, Ethayarajh et al., 2024): single replies judged desirable or "
    "undesirable",
}


def _preference_front_matter(started: str, data_source: str, algorithm: str) -> str:
    """The Hub's YAML metadata of a preference-tuned model, with huggingface_hub's ModelCardData."""
    hub_data = data_source[len("hub:") :].split("@")[0].split(":")[0] if data_source.startswith("hub:") else None
    card_data = ModelCardData(
        # The licence is that of the starting model's training data and of the preferences: gpt2ft cannot know it.
        license="other",
        license_name="see-the-training-data",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["gpt2", "dialogue", "text-generation", "conversational", "gpt2ft", algorithm, "trl"],
        datasets=[hub_data] if hub_data else None,
        base_model=started if is_hub_id(started) else None,
    )
    return "---\n" + card_data.to_yaml() + "\n---"


def _preference_results(metrics: Mapping[str, Any]) -> str:
    dpo = metrics.get("algorithm") == "dpo"
    rows = [
        [
            "reward accuracy",
            format_float(metrics.get("reward_accuracy_before"), 3),
            format_float(metrics.get("reward_accuracy_after"), 3),
        ],
        [
            "reward margin",
            format_float(metrics.get("reward_margin_before"), 3),
            format_float(metrics.get("reward_margin_after"), 3),
        ],
    ]
    if dpo:
        rows.append(
            [
                "the model finds the chosen reply likelier",
                format_float(metrics.get("logp_accuracy_before"), 3),
                format_float(metrics.get("logp_accuracy_after"), 3),
            ]
        )
    for prefix, split in (("eval", "validation"), ("test", "test")):
        for key, label, formatter in (
            ("loss", "loss", format_loss),
            ("perplexity", "perplexity", format_perplexity),
            ("bits_per_byte", "bits per byte", lambda value: format_float(value, 3)),
        ):
            before, after = metrics.get(f"base_{prefix}_{key}"), metrics.get(f"{prefix}_{key}")
            if before is not None or after is not None:
                rows.append([f"supervised {split} {label}", formatter(before), formatter(after)])
    if not any(row[0].startswith("supervised") for row in rows):
        rows.append(
            [
                "supervised validation perplexity",
                format_perplexity(metrics.get("sft_perplexity_before")),
                format_perplexity(metrics.get("sft_perplexity_after")),
            ]
        )
    unit = "pairs" if dpo else "examples"
    held_out = format_int(metrics.get(f"eval_{unit}"))
    reward = (
        "The implicit reward of a reply is beta * log(p_model(reply) / p_start(reply)), beta = "
        f"{format_short(metrics.get('beta'))}. "
        + (
            f"Reward accuracy: the share of the {held_out} held-out pairs whose better reply gets the higher reward; "
            "margin: the mean difference. Before tuning the model is its own reference, so both are 0. The third row "
            "needs no reference: the share of pairs where the model itself gives the better reply the higher "
            "probability."
            if dpo
            else f"Reward accuracy: the share of the {held_out} held-out replies whose reward has the sign of their "
            "judgement (desirable > 0, undesirable < 0); margin: mean desirable reward minus mean undesirable reward. "
            "Before tuning both are 0."
        )
    )
    sft = metrics.get("sft_data")
    perplexity = (
        f"Loss, perplexity and bits per byte are measured on {format_int(metrics.get('sft_dialogs'))} validation and "
        f"{format_int(metrics.get('sft_test_dialogs'))} test dialogues of the supervised data ({code(sft)}), before "
        "and after: a preference stage that damages the language model shows here."
        if sft
        else "No supervised data was recorded with the starting model, so its perplexity was not measured."
    )
    return "\n".join(
        [
            "## Results",
            "",
            *_unchanged_warning(metrics),
            _table(["held-out measure", "before", "after"], rows),
            "",
            reward,
            "",
            perplexity,
            "",
            "![preference tuning](chart_prefer.png)",
            "",
            "![training](chart_train.png)",
        ]
    )


def _preference_data(metrics: Mapping[str, Any]) -> str:
    counts = metrics.get("data_counts") if isinstance(metrics.get("data_counts"), Mapping) else {}
    winners = counts.get("winners") if isinstance(counts.get("winners"), Mapping) else None
    unit = "pairs" if metrics.get("algorithm") == "dpo" else "examples"
    lines = [
        "## Preference data",
        "",
        f"- Source: {code(metrics.get('data_source'))} ({format_short(metrics.get('data_layout'))} layout)",
    ]
    if winners:
        lines.append(
            f"- Votes of the blind comparison page: {format_int(winners.get('votes'))} in all, "
            f"{format_int(winners.get('a'))} 'A is better', {format_int(winners.get('b'))} 'B is better', "
            f"{format_int(winners.get('tie'))} ties, {format_int(winners.get('both_bad'))} 'both are bad'"
        )
    for split, label in (("train", "training"), ("validation", "held out")):
        split_counts = counts.get(split) if isinstance(counts.get(split), Mapping) else {}
        lines.append(f"- {label.capitalize()} {unit}: {format_int(split_counts.get('used'))}")
    lines.append(f"- Held out: {md_escape(counts.get('held_out', NA))}")
    for line in metrics.get("skipped") or []:
        lines.append(f"- Skipped: {md_escape(line)}")
    return "\n".join(lines)


def _preference_settings(metrics: Mapping[str, Any], settings: Mapping[str, Any], started: str) -> str:
    method = metrics.get("method") or settings.get("method")
    method_text = (
        f"LoRA (r={format_short(settings.get('lora_r'))}, alpha={format_short(settings.get('lora_alpha'))}, modules "
        f"{settings.get('lora_targets', NA)}), merged into the saved weights; the reference was the model with its "
        "adapters off"
        if method == "lora"
        else "every weight tuned; the reference was a frozen copy of the starting model"
    )
    rows = [
        ("stage", f"preference tuning with {str(metrics.get('algorithm', NA)).upper()} (TRL)"),
        ("started from", code(started) if started else NA),
        ("beta", format_short(metrics.get("beta"))),
        ("method", method_text),
        (
            "trainable / total parameters",
            f"{format_int(metrics.get('trainable_parameters'))} / {format_int(metrics.get('total_parameters'))}",
        ),
        (
            "epochs",
            f"{format_float(metrics.get('epochs'), 2)} completed ({format_short(settings.get('epochs'))} configured)",
        ),
        ("optimiser steps", format_int(metrics.get("steps"))),
        (
            "batch size per device x accumulation",
            f"{format_short(settings.get('batch_size'))} x {format_short(settings.get('gradient_accumulation_steps'))}",
        ),
        (
            "learning rate",
            f"{format_short(settings.get('learning_rate'))} (warmup {format_short(settings.get('warmup_ratio'))} of "
            "the steps, then linear decay)",
        ),
        (
            "max sequence length",
            f"{format_int(metrics.get('max_length'))} tokens (prompt + reply; a longer prompt keeps its latest turns)",
        ),
        ("precision", format_short(metrics.get("precision"))),
        ("seed", format_short(settings.get("seed"))),
    ]
    return "\n".join(
        ["## Training", "", _table(["setting", "value"], [[name, value] for name, value in rows], numbers=False)]
    )


def _preference_samples(samples: Sequence[Mapping[str, Any]]) -> str:
    lines = ["## Sample replies", ""]
    if not samples:
        return "\n".join(lines + ["No samples were generated for this run."])
    lines += ["The model's greedy reply to held-out conversations, beside the replies the preference data judged:", ""]
    for number, sample in enumerate(samples, 1):
        lines += [f"**Conversation {number}**", ""]
        for message in sample.get("prompt") or []:
            text = str(message.get("content", ""))
            lines.append(
                f"- *{str(message.get('role', '')).capitalize()}:* "
                f"{md_escape(text[:CONTEXT_CHARS] + ('...' if len(text) > CONTEXT_CHARS else ''))}"
            )
        reply = str(sample.get("reply") or "").strip()
        lines.append(f"- *Model:* {md_escape(reply) if reply else '*(empty reply)*'}")
        if "chosen" in sample:
            lines.append(f"- *Preferred in the data:* {md_escape(sample['chosen']) or '*(empty reply)*'}")
            lines.append(f"- *Rejected in the data:* {md_escape(sample['rejected']) or '*(empty reply)*'}")
        elif "completion" in sample:
            verdict = "desirable" if sample.get("label") else "undesirable"
            lines.append(f"- *Judged {verdict} in the data:* {md_escape(sample['completion']) or '*(empty reply)*'}")
        lines.append("")
    return "\n".join(lines).rstrip()


def render_preference_card(
    metrics: Mapping[str, Any],
    training_config: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]],
    hardware_name: str = "",
) -> str:
    """The Markdown README.md of a preference-tuned model: which stage made it, from which model and data, the
    held-out scores and supervised perplexity before and after, the settings, samples, usage and limitations.

    Args:
        metrics: metrics.json of the preference run (prefer.preference_metrics).
        training_config: the saved training_config.json (prefer_config = the PreferConfig dict, started_from).
        samples: [{"prompt": [messages], "reply", "chosen", "rejected"}] or with "completion" and "label" (KTO).

    Missing keys show as "n/a"; the card never fails to render.
    """
    metrics = metrics or {}
    training_config = training_config or {}
    settings = training_config.get("prefer_config") if isinstance(training_config.get("prefer_config"), Mapping) else {}
    started = str(training_config.get("started_from") or metrics.get("started_from") or settings.get("model") or "")
    algorithm = str(metrics.get("algorithm") or settings.get("algorithm") or "dpo")
    source = str(metrics.get("data_source") or settings.get("data") or NA)
    folder = str(settings.get("output_dir") or "gpt2_preferred")
    started_text = (
        f"[{code(started)}](https://huggingface.co/{started})" if is_hub_id(started) else code(started or "GPT-2")
    )
    summary = (
        f"{started_text} tuned to the preferences in {code(source)} with {algorithm.upper()}, by gpt2ft "
        f"{format_short(training_config.get('gpt2ft_version'))}: {ALGORITHM_TEXT.get(algorithm, algorithm)}. "
        f"Held-out reward accuracy {format_float(metrics.get('reward_accuracy_after'), 3)}; supervised validation "
        f"perplexity {format_perplexity(metrics.get('sft_perplexity_before'))} before, "
        f"{format_perplexity(metrics.get('sft_perplexity_after'))} after."
    )
    limitations = GENERIC_LIMITATIONS + (
        "\n- **Preferences are only as good as the votes.** A few hundred votes from a few people teach their taste, "
        "and a model tuned too far on them loses what fine-tuning taught: compare it blind with the model it started "
        "from (`python -m gpt2ft serve --model " + folder + "`) before you use it."
    )
    return "\n".join(
        [
            _preference_front_matter(started, source, algorithm),
            "",
            f"# GPT-2 preference-tuned with {algorithm.upper()}",
            "",
            summary,
            "",
            _preference_results(metrics),
            "",
            _preference_samples(samples or []),
            "",
            _usage(folder),
            "",
            _preference_data(metrics),
            "",
            _preference_settings(metrics, settings, started),
            "",
            _hardware(metrics, hardware_name),
            "",
            limitations,
            "",
        ]
    )
