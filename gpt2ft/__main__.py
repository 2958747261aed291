"""`python -m gpt2ft <command>`: see gpt2ft/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
