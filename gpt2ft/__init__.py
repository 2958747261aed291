"""gpt2ft: fine-tune GPT-2 on DailyDialog and chat with the result.

python -m gpt2ft train      # fine-tune (see `python -m gpt2ft --help` for every command)
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes logs a warning about an optional 4-bit CPU kernel at import (transformers' Trainer imports it);
# gpt2ft never uses 4-bit kernels, and the warning would pollute every command's one-line error output.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
