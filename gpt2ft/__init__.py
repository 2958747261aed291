"""gpt2ft: fine-tune GPT-2 and the small causal LMs beside it on conversations, and chat with the result.

python -m gpt2ft train      # fine-tune (see `python -m gpt2ft --help` for every command)
"""

__version__ = "0.1.0"

import logging as _logging
import sys as _sys


class _StderrHandler(_logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a notebook or a test may have replaced it since)."""

    def __init__(self) -> None:
        super().__init__(_sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return _sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


# gpt2ft's progress notes ("gpt2ft: resuming from ...") go to stderr: stdout carries a command's one JSON line.
_logger = _logging.getLogger(__name__)
if not _logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(_logging.Formatter("gpt2ft: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False

# bitsandbytes logs a warning about an optional 4-bit CPU kernel at import (transformers' Trainer imports it);
# gpt2ft never uses 4-bit kernels, and the warning would pollute every command's one-line error output.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
