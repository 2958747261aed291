"""Whether gpt2ft runs inside Google Colab, for the few things that differ there.

    python -c "from gpt2ft.colab import in_colab; print(in_colab())"   # False anywhere but Colab

The library asks here rather than `gpt2ft.notebook`, which sits on top of the library and imports its stages:
`serve.serve_in_notebook` opens a public share link on Colab, `export.export_for_notebook` offers the GGUF file
for download there, and the notebook's own helpers (`mount_drive`, `environment_report`) use it too.
"""

from __future__ import annotations

import sys


def in_colab() -> bool:
    """True inside Google Colab (its kernel has imported `google.colab` before any cell runs)."""
    return "google.colab" in sys.modules
