"""gpt2ft: fine-tune GPT-2 on DailyDialog and chat with the result.

    python -m gpt2ft train      # fine-tune (see `python -m gpt2ft --help` for every command)
"""

__version__ = "0.1.0"
