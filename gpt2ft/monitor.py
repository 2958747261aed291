"""System metrics while training: a background thread appends CPU, memory, disk, network and GPU readings to a
JSONL file (`logs/system.jsonl`), one JSON object a line.

    python -m gpt2ft train --system-interval-s 2      # train() runs a SystemMonitor for the whole run
    python -m gpt2ft charts --logs-dir logs            # draws the samples into images/chart_*.png

Fields of a sample (a field whose reading fails is left out; GPU fields only when CUDA is available):
    timestamp (unix s), elapsed_s (since start()), step (training step, or null)
    process_cpu_percent (100 = one core busy), system_cpu_percent (100 = every core busy), cpu_count
    process_rss_mb, tree_memory_mb (with tree_memory: this process and its workers), system_ram_used_mb,
    system_ram_total_mb, system_ram_percent
    disk_read_bytes, disk_write_bytes, net_sent_bytes, net_recv_bytes (cumulative counters of the machine)
    gpu_index, gpu_name, gpu_util_percent, gpu_memory_util_percent, gpu_memory_used_mb, gpu_memory_total_mb,
    gpu_power_w, gpu_power_limit_w, gpu_temperature_c (NVML), torch_allocated_mb, torch_reserved_mb,
    torch_max_reserved_mb (torch.cuda's caching allocator, this process only)
Sizes are in MB of 10**6 bytes. CPU percentages cover the time since the previous sample; the first sample's
cover the time since the process started (process) and since boot (system).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# psutil and pynvml are imported inside the readings that use them: a missing or broken one costs only its fields
# (recorded in `errors`), never the import of this module or the run, and pynvml (which loads NVML's library) only
# on a GPU sample. torch is never imported here (see _cuda_available).

MB = 1_000_000


def _cpu_busy_and_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds of all cores, counted the way psutil.cpu_percent counts them."""
    total = sum(times)
    # Linux counts guest time inside user time too; subtracting it avoids counting it twice.
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


class SystemMonitor:
    """Samples system metrics every `interval_s` seconds on a daemon thread and appends them to `path`.

    A first sample is written by start() itself and a last one when stop() is called, so even a run shorter than
    the interval has two. Every reading is wrapped on its own: a failing sensor drops its field, never the
    sample, and never the training run. The training loop is never blocked: the thread shares no lock with it.

        with SystemMonitor(Path("logs/system.jsonl"), 2.0, step_getter=lambda: trainer.state.global_step):
            trainer.train()

    Args:
        path: the JSONL file to append to (its folder is created); None keeps no file, only `peak_rss_mb` (the
            benchmark and `prepare` measure peak memory this way).
        interval_s: seconds between samples.
        step_getter: returns the current training step, recorded with each sample.
        gpu: sample the GPU; None = when torch is imported and CUDA is available.
        device_index: the CUDA device to sample; None = the current device (LOCAL_RANK before CUDA starts).
        only: read only these field groups (of "step", "cpu", "memory", "disk", "network", "nvml", "torch_cuda").
        tree_memory: also read `tree_memory_mb`, the resident memory of this process and its workers (the sum of
            their proportional set sizes: pages a worker shares with its parent after fork count once, not in
            each); `peak_rss_mb` then follows it. Slower to read (smaps), so for intervals of 0.1 s or more.
    """

    def __init__(
        self,
        path: str | Path | None,
        interval_s: float,
        step_getter: Callable[[], int] | None = None,
        *,
        gpu: bool | None = None,
        device_index: int | None = None,
        only: tuple[str, ...] | None = None,
        tree_memory: bool = False,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.path = Path(path) if path is not None else None
        self.only = only
        self.tree_memory = tree_memory
        self.peak_rss_mb = 0.0
        self.interval_s = float(interval_s)
        self.step_getter = step_getter
        self.samples = 0
        self.errors: dict[str, str] = {}  # field group -> last error, for debugging a silent sensor
        self._gpu_wanted = gpu
        self._device_index = device_index
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0
        self._process: Any = None
        self._last_process_cpu: tuple[float, float] | None = None
        self._last_system_cpu: tuple[float, float] | None = None
        self._system_cpu_percent: float | None = None
        self._nvml: Any = None
        self._nvml_handle: Any = None
        self._nvml_failed = False
        self._gpu_name: str | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ----------------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> SystemMonitor:
        """Write the first sample now, then keep sampling on a daemon thread. A no-op while already running."""
        if self.running:
            return self
        self._stop_event = threading.Event()
        self._started_at = time.time()
        self._setup()
        self._write(self.sample())
        self._thread = threading.Thread(target=self._run, name="gpt2ft-system-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Signal the thread, which writes a last sample and exits; wait for it. Safe to call more than once."""
        thread = self._thread
        if thread is None:
            return
        self._stop_event.set()
        thread.join(timeout_s)
        if not thread.is_alive():
            self._thread = None
            self._shutdown_nvml()

    def __enter__(self) -> SystemMonitor:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _run(self) -> None:
        # Event.wait returns as soon as stop() sets the event, so stopping never waits out an interval.
        while not self._stop_event.wait(self.interval_s):
            self._write(self.sample())
        self._write(self.sample())

    def _write(self, record: dict[str, Any]) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, record.get("tree_memory_mb", record.get("process_rss_mb", 0.0)))
        if self.path is None:
            self.samples += 1
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
            self.samples += 1
        except Exception as error:  # a full disk must not end the training run
            self.errors["write"] = repr(error)

    # ----------------------------------------------------------------------------------------------------------
    # Readings
    # ----------------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        try:
            import psutil

            self._process = psutil.Process()
        except Exception as error:
            self._process = None
            self.errors["psutil"] = repr(error)
        if self._gpu_wanted is None:
            self._gpu_wanted = self._cuda_available()
        if self._gpu_wanted and self._device_index is None:
            self._device_index = self._current_device()

    @staticmethod
    def _cuda_available() -> bool:
        # Only a process that imported torch can be using CUDA; importing it here would cost seconds.
        torch = sys.modules.get("torch")
        try:
            return bool(torch is not None and torch.cuda.is_available())
        except Exception:
            return False

    @staticmethod
    def _current_device() -> int:
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                return int(torch.cuda.current_device())
        except Exception:
            pass
        return int(os.environ.get("LOCAL_RANK", "0") or 0)

    def sample(self) -> dict[str, Any]:
        """One reading of every metric (what each line of the file holds)."""
        now = time.time()
        record: dict[str, Any] = {
            "timestamp": round(now, 3),
            "elapsed_s": round(now - self._started_at, 3),
            "step": None,
        }
        readers = [
            ("step", self._read_step),
            ("cpu", self._read_cpu),
            ("memory", self._read_memory),
            ("disk", self._read_disk),
            ("network", self._read_network),
        ]
        if self._gpu_wanted:
            readers += [("nvml", self._read_nvml), ("torch_cuda", self._read_torch_cuda)]
        if self.only is not None:
            readers = [(name, reader) for name, reader in readers if name in self.only]
        for name, reader in readers:
            try:
                record.update(reader())
            except Exception as error:
                self.errors[name] = repr(error)
        return record

    def _read_step(self) -> dict[str, Any]:
        return {"step": int(self.step_getter())} if self.step_getter is not None else {}

    def _read_cpu(self) -> dict[str, Any]:
        import psutil

        fields: dict[str, Any] = {"cpu_count": psutil.cpu_count()}
        now = time.time()
        if self._process is not None:
            times = self._process.cpu_times()
            used = times.user + times.system
            # Before the first reading the baseline is the process start: a meaningful average, not psutil's 0.0.
            last_used, last_time = self._last_process_cpu or (0.0, self._process.create_time())
            if now > last_time:
                fields["process_cpu_percent"] = round(100.0 * max(0.0, used - last_used) / (now - last_time), 2)
            self._last_process_cpu = (used, now)
        busy, total = _cpu_busy_and_total(psutil.cpu_times())
        last_busy, last_total = self._last_system_cpu or (0.0, 0.0)
        if total > last_total:
            self._system_cpu_percent = round(100.0 * min(1.0, max(0.0, (busy - last_busy) / (total - last_total))), 2)
            self._last_system_cpu = (busy, total)
        # The kernel's counters move in clock ticks: two samples a few ms apart can see no change, so the last
        # value stands (and the baseline stays, so the next sample covers the whole span).
        if self._system_cpu_percent is not None:
            fields["system_cpu_percent"] = self._system_cpu_percent
        return fields

    def _read_memory(self) -> dict[str, Any]:
        import psutil

        fields: dict[str, Any] = {}
        if self._process is not None:
            fields["process_rss_mb"] = round(self._process.memory_info().rss / MB, 2)
            if self.tree_memory:
                # Worker processes (datasets.map's num_proc) count too; PSS counts their shared pages once.
                total = 0
                for process in [self._process, *self._process.children(recursive=True)]:
                    try:
                        total += process.memory_full_info().pss
                    except Exception:  # a worker that just exited
                        pass
                fields["tree_memory_mb"] = round(total / MB, 2)
        memory = psutil.virtual_memory()
        fields.update(
            system_ram_used_mb=round((memory.total - memory.available) / MB, 2),
            system_ram_total_mb=round(memory.total / MB, 2),
            system_ram_percent=memory.percent,
        )
        return fields

    def _read_disk(self) -> dict[str, Any]:
        import psutil

        counters = psutil.disk_io_counters()  # None in some containers
        return {"disk_read_bytes": counters.read_bytes, "disk_write_bytes": counters.write_bytes} if counters else {}

    def _read_network(self) -> dict[str, Any]:
        import psutil

        counters = psutil.net_io_counters()
        return {"net_sent_bytes": counters.bytes_sent, "net_recv_bytes": counters.bytes_recv} if counters else {}

    def _nvml_device(self) -> Any:
        """The NVML handle of the sampled device, or None when NVML is missing or fails (tried once)."""
        if self._nvml_handle is not None or self._nvml_failed:
            return self._nvml_handle
        try:
            import pynvml  # from the nvidia-ml-py package; optional

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._nvml_handle = self._find_nvml_handle(pynvml, self._device_index or 0)
            name = pynvml.nvmlDeviceGetName(self._nvml_handle)
            self._gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as error:
            self._nvml_failed = True
            self._nvml_handle = None
            self.errors["nvml"] = repr(error)
        return self._nvml_handle

    @staticmethod
    def _find_nvml_handle(pynvml: Any, index: int) -> Any:
        # NVML numbers every GPU of the machine; CUDA numbers only the visible ones, so map through the UUID.
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_initialized():
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception:
            pass
        visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
        if index < len(visible):
            entry = visible[index]
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def _read_nvml(self) -> dict[str, Any]:
        handle = self._nvml_device()
        if handle is None:
            return {}
        nvml = self._nvml
        fields: dict[str, Any] = {"gpu_index": self._device_index, "gpu_name": self._gpu_name}
        # Each sensor on its own: consumer and virtual GPUs lack some (power on many vGPUs).
        readings: list[tuple[Callable[[], dict[str, Any]], str]] = [
            (lambda: self._nvml_utilisation(nvml, handle), "nvml_utilisation"),
            (lambda: self._nvml_memory(nvml, handle), "nvml_memory"),
            (lambda: {"gpu_power_w": round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, 2)}, "nvml_power"),
            (
                lambda: {"gpu_power_limit_w": round(nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0, 2)},
                "nvml_power_limit",
            ),
            (
                lambda: {"gpu_temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)},
                "nvml_temperature",
            ),
        ]
        for read, name in readings:
            try:
                fields.update(read())
            except Exception as error:
                self.errors[name] = repr(error)
        return fields

    @staticmethod
    def _nvml_utilisation(nvml: Any, handle: Any) -> dict[str, Any]:
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        return {"gpu_util_percent": rates.gpu, "gpu_memory_util_percent": rates.memory}

    @staticmethod
    def _nvml_memory(nvml: Any, handle: Any) -> dict[str, Any]:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu_memory_used_mb": round(memory.used / MB, 2), "gpu_memory_total_mb": round(memory.total / MB, 2)}

    def _read_torch_cuda(self) -> dict[str, Any]:
        torch = sys.modules.get("torch")
        # Asking an uninitialised torch.cuda for stats would create a CUDA context from this thread.
        if torch is None or not torch.cuda.is_initialized():
            return {}
        index = self._device_index or 0
        return {
            "torch_allocated_mb": round(torch.cuda.memory_allocated(index) / MB, 2),
            "torch_reserved_mb": round(torch.cuda.memory_reserved(index) / MB, 2),
            "torch_max_reserved_mb": round(torch.cuda.max_memory_reserved(index) / MB, 2),
        }

    def _shutdown_nvml(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml = self._nvml_handle = None
        self._nvml_failed = False
