"""The Trainer's progress table in a notebook, with each evaluation table named by its split.

    jupyter lab GPT2_fine_tuning.ipynb       # the fit and evaluate cells show these tables

In a notebook the Trainer draws its progress bar and a table of the training and validation loss
(transformers' NotebookProgressCallback). An evaluation outside training, such as the test split scored after it,
gets a table of its own, and transformers heads its loss column "Validation Loss" whatever the split; here
each such table names its split ("Test Loss", "Test Perplexity"). Imported only in a notebook (by
training.DialogueTrainer, when the Trainer picked the notebook callback): it loads IPython's display.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers.utils.notebook import NotebookProgressCallback, text_to_html_table

# The Trainer's metric prefix of each split, as the tables name it.
SPLIT_NAMES = {"eval": "Validation", "test": "Test"}
# Per-call timings the Trainer adds to every evaluation: not results.
TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def metric_prefix(metrics: Mapping[str, Any]) -> str:
    """The split an evaluation's metrics belong to: the prefix of its `<prefix>_loss` key ("eval" without one)."""
    return next((key[: -len("_loss")] for key in metrics if key.endswith("_loss")), "eval")


def split_table(metrics: Mapping[str, Any], step: int, epoch: float | None) -> list[list[Any]]:
    """[headers, values] of one evaluation: the step and epoch, then each of its results, headed by its split
    ("Test Loss", "Test Perplexity", "Test Bits Per Byte"); the timings are left out."""
    prefix = metric_prefix(metrics)
    split = SPLIT_NAMES.get(prefix, prefix.replace("_", " ").title())
    headers: list[Any] = ["Step"] + (["Epoch"] if epoch is not None else [])
    values: list[Any] = [step] + ([round(epoch, 2)] if epoch is not None else [])
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(f"{prefix}_") else None
        if name and name not in TIMINGS:
            headers.append(f"{split} {' '.join(part.capitalize() for part in name.split('_'))}")
            values.append(value)
    return [headers, values]


class SplitProgressCallback(NotebookProgressCallback):
    """NotebookProgressCallback whose evaluations outside training each get a table headed by their split."""

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any):
        metrics = metrics or {}
        if self.training_tracker is not None and metric_prefix(metrics) == "eval":
            return super().on_evaluate(args, state, control, metrics=metrics, **kwargs)  # a row of training's table
        from IPython.display import HTML, display

        display(HTML(text_to_html_table(split_table(metrics, state.global_step, state.epoch))))
        self.prediction_bar = None
        return None
