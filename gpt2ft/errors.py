"""The errors that mean bad input or a run that had to stop: each is reported as one line, with exit code 2.

    python -m gpt2ft train --epochs 0      # error: --epochs: must be a positive number, got 0.0

Every module raises its own kind (a ConfigError names the flag, a DataError the file and line, ...); all of them are
a `Gpt2ftError`, which is what the command line catches. This module imports nothing, so the command line can tell
them apart before torch or transformers load.
"""

from __future__ import annotations


class Gpt2ftError(Exception):
    """Bad input, or a run that had to stop; the message is one line that says what and where."""


class ConfigError(Gpt2ftError, ValueError):
    """A setting is invalid; the message names the setting (as its CLI flag) and why."""


class DataError(Gpt2ftError, ValueError):
    """The data cannot be read; the message names the file (and line) and what is wrong."""


class ModelError(Gpt2ftError, ValueError):
    """The model or tokenizer cannot be used; the message names the folder or Hub id and why."""


class TrainingError(Gpt2ftError, RuntimeError):
    """Training cannot start or had to stop; the message says why and what to do."""


class DiskFullError(TrainingError):
    """A disk filled up while gpt2ft wrote to it; the message names the folder, the space needed and what was kept."""


class UnchangedWeightsError(TrainingError):
    """Training finished but the saved weights equal the starting model's: every update was too small (a learning
    rate too low for the steps taken) or skipped; the message says what to change. The model is saved all the same."""
