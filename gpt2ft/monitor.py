"""PLACEHOLDER (being replaced): system-metrics sampler."""
from pathlib import Path


class SystemMonitor:
    def __init__(self, path, interval_s, step_getter=None):
        self.path = Path(path)

    def start(self):
        return self

    def stop(self):
        return None
