"""A run's folders, written so that nothing finished is ever lost: the output folder, its checkpoints beside it, an
atomic final save, and resuming only the same run.

    gpt2_finetuned/               the final model: written into a hidden staging folder, then swapped in
    gpt2_finetuned.checkpoints/   the Trainer's checkpoints, outside the folder that is swapped, so no failure
                                  during the final save (an error, Ctrl-C, a full disk) can touch them

A checkpoint is complete once gpt2ft's marker file is in it (written after the Trainer has written everything
else); the marker also records the settings that define the run, and a resume refuses a checkpoint made with
other settings.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .config import TRAINING_CONFIG, config_fields, flag_name, render_flag
from .errors import TrainingError
from .logs import space_for, write_json, write_text_atomic

CHECKPOINT_SUFFIX = ".checkpoints"
COMPLETE_MARKER = "gpt2ft_checkpoint.json"
STALE_KINDS = ("partial", "old")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live: `gpt2_finetuned` -> `gpt2_finetuned.checkpoints` (a sibling)."""
    output = Path(output_dir)
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def staging_dir(output_dir: Path, kind: str) -> Path:
    """The hidden sibling used while swapping: `.gpt2_finetuned.partial-<pid>` (being written) or `.old-<pid>`."""
    return output_dir.parent / f".{output_dir.name}.{kind}-{os.getpid()}"


# --------------------------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------------------------


KEEP_FILE = ".gitkeep"  # what keeps the repository's empty gpt2_finetuned/ in git


def is_gpt2ft_output(path: Path) -> bool:
    """True if `path` holds a model written by gpt2ft (or is the repository's empty artifact folder)."""
    marker = path / TRAINING_CONFIG
    if marker.is_file():
        try:
            return "gpt2ft_version" in json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    return {entry.name for entry in path.iterdir()} <= {KEEP_FILE}


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that holds something other than a previous gpt2ft model, unless `overwrite`.

    Raises:
        TrainingError: the path is a file, or a folder with foreign content.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite and not is_gpt2ft_output(path):
        raise TrainingError(
            f"--output-dir {path}: exists and holds files that gpt2ft did not write; choose another folder or pass "
            "--overwrite"
        )


def clean_stale_folders(output_dir: str | Path) -> list[Path]:
    """Tidy what a killed run left beside the output folder, before a new run starts.

    A run killed between the two renames of `save_final_model` leaves no output folder but the previous model in an
    `.old-*` folder: that one is put back. Every other `.partial-*` / `.old-*` folder is deleted.

    Returns:
        The folders deleted.
    """
    output = Path(output_dir).resolve()
    stale = sorted(
        (path for kind in STALE_KINDS for path in output.parent.glob(f".{output.name}.{kind}-*") if path.is_dir()),
        key=lambda path: path.stat().st_mtime,
    )
    olds = [path for path in stale if ".old-" in path.name]
    if not output.exists() and olds:
        olds[-1].rename(output)
        stale.remove(olds[-1])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_final_model(
    model: Any,
    tokenizer: Any,
    generation_config: Any,
    training_config: dict[str, Any],
    output_dir: str | Path,
    extra_files: list[Path] | None = None,
    adapter: Any = None,
) -> Path:
    """Write model (safetensors), tokenizer, generation_config.json and training_config.json, atomically.

    Steps: write everything into a hidden staging folder; rename the previous model folder aside (`.old-*`); rename
    the staging folder into place; delete the old folder. A failure in any step leaves the previous model folder in
    place (put back from `.old-*` if it had been moved), and the checkpoints, which live outside, untouched.

    Args:
        extra_files: files to copy in.
        adapter: a LoRA adapter (scale.SavedAdapter) also saved, under `adapter/`.

    Raises:
        DiskFullError: the disk filled up while writing (the folder and the space needed, in one line).
    """
    output = Path(output_dir).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging, old = staging_dir(output, "partial"), staging_dir(output, "old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        # A full disk is measured here, before the staging folder is removed below, and said in one line.
        with space_for(output, lambda: tensor_bytes(model), "the model", kept="the folder was left as it was"):
            model.generation_config = generation_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            write_json(staging / TRAINING_CONFIG, training_config)
            for path in extra_files or []:
                shutil.copy2(path, staging / Path(path).name)
            if adapter is not None:
                adapter.save_pretrained(staging / "adapter")
            if (output / KEEP_FILE).is_file():  # the repository's tracked placeholder outlives the folder's swap
                shutil.copy2(output / KEEP_FILE, staging / KEEP_FILE)
        if output.exists():
            output.rename(old)
        staging.rename(output)
    except BaseException:
        if old.exists() and not output.exists():
            old.rename(output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # a leftover is deleted by clean_stale_folders at the next start
    return output


def tensor_bytes(model: Any) -> int:
    """The bytes of a model's weights as saved (tied tensors once): what save_pretrained writes, give or take."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict().values():
        seen.setdefault(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def folder_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and resuming
# --------------------------------------------------------------------------------------------------------------


def checkpoint_step(checkpoint: str | Path) -> int:
    name = Path(checkpoint).name
    step = name.rsplit("-", 1)[-1]
    return int(step) if name.startswith("checkpoint-") and step.isdigit() else -1


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints that finished saving (they carry gpt2ft's marker), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.glob("checkpoint-*")
        if checkpoint_step(path) >= 0 and (path / COMPLETE_MARKER).is_file() and (path / "trainer_state.json").is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """Delete checkpoint folders that never finished saving (killed mid-save): they must not be resumed from, and
    the Trainer's checkpoint rotation would otherwise count them."""
    folder = Path(folder)
    complete = set(complete_checkpoints(folder))
    removed = [path for path in folder.glob("checkpoint-*") if path.is_dir() and path not in complete]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (model, optimizer, RNG, state), and
    records in the marker the settings that define the run."""

    def __init__(self, run_settings: dict[str, Any]) -> None:
        self.run_settings = run_settings

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_text_atomic(
                    folder / COMPLETE_MARKER,
                    json.dumps({"step": state.global_step, "run": self.run_settings}, indent=2),
                )
        return control


def read_run_settings(checkpoint: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def describe_differences(
    old: dict[str, Any], new: dict[str, Any], config_class: type | None = None
) -> tuple[list[str], list[str]]:
    """(each differing setting as `name old -> new`, the flags that give the old values back); the flags are the
    fields of the stage's config (TrainConfig unless another class is given)."""
    flags = {item.name for item in config_fields(config_class)}
    changes, restore = [], []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            changes.append(f"{name} {old.get(name)!r} -> {new.get(name)!r}")
            if name in flags:
                # A setting that was unset (None) comes back by leaving its flag out.
                restore.append(
                    render_flag(name, old[name]) if old.get(name) is not None else f"without {flag_name(name)}"
                )
    return changes, restore


def find_resume_checkpoint(
    folder: str | Path, resume: str, run_settings: dict[str, Any], config_class: type | None = None
) -> str | None:
    """The checkpoint to resume from: None for 'never' (or no checkpoint), the latest complete one for 'auto', or
    the given path; it must have been made by a run with the same `run_settings` (of a `config_class` run,
    TrainConfig unless another is given: it names the flags that restore the old values).

    Raises:
        TrainingError: a path that is not a complete checkpoint, or a checkpoint of a run with other settings.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(folder)
        if not found:
            return None
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise TrainingError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    saved = read_run_settings(checkpoint)
    if saved is not None and saved != run_settings:
        changes, restore = describe_differences(saved, run_settings, config_class)
        old_way = (
            f"run again with the old settings ({' '.join(restore)})"
            if restore
            else "run again with the old settings and data"
        )
        raise TrainingError(
            f"--resume {resume}: {checkpoint} belongs to a run with other settings: {'; '.join(changes)}. "
            f"To continue that run, {old_way}; to start a new one, add --resume never"
        )
    return str(checkpoint)
