"""SystemMonitor: samples land in the JSONL file, the thread stops promptly, failures never escape; and one short
end-to-end training run through the CLI that checks every artifact of "see the run" (logs, charts, model card)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_jsonl

from gpt2ft.monitor import SystemMonitor

BASE_FIELDS = {"timestamp", "elapsed_s", "step"}
CPU_FIELDS = {"cpu_count", "process_cpu_percent", "system_cpu_percent"}
MEMORY_FIELDS = {"process_rss_mb", "system_ram_used_mb", "system_ram_total_mb", "system_ram_percent"}
TRAIN_LINE_FIELDS = {
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "learning_rate",
    "tokens_seen",
    "tokens_per_s",
    "train_seconds",
}
CHARTS = {"chart_train.png", "chart_gpu.png", "chart_gpu2.png", "chart_memory.png", "chart_cpu_disk.png"}


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (a bound, not a timing the test depends on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_sampler_records_samples_and_stops(tmp_path):
    path = tmp_path / "logs" / "system.jsonl"
    monitor = SystemMonitor(path, 0.05, step_getter=lambda: 7)
    monitor.start()
    try:
        assert wait_for(lambda: monitor.samples >= 3), "the background thread wrote no samples"
    finally:
        monitor.stop()
    assert not monitor.running
    assert not any(thread.name == "gpt2ft-system-monitor" for thread in threading.enumerate())
    records = read_jsonl(path)
    assert len(records) == monitor.samples >= 4  # 3 + the last one written at stop
    for record in records:
        assert BASE_FIELDS | CPU_FIELDS | MEMORY_FIELDS <= record.keys(), record
        assert record["step"] == 7
        assert 0 < record["process_rss_mb"] <= record["system_ram_total_mb"]
        assert 0 <= record["system_cpu_percent"] <= 100
    stamps = [record["timestamp"] for record in records]
    assert stamps == sorted(stamps)
    assert records[0]["elapsed_s"] < records[-1]["elapsed_s"]


def test_first_sample_at_start_last_at_stop_without_waiting_an_interval(tmp_path):
    path = tmp_path / "system.jsonl"
    monitor = SystemMonitor(path, interval_s=3600)
    monitor.start()
    assert monitor.samples == 1 and len(read_jsonl(path)) == 1  # written by start() itself
    started = time.monotonic()
    monitor.stop()
    assert time.monotonic() - started < 5, "stop() waited for the sampling interval"
    assert not monitor.running
    assert monitor.samples == 2 and len(read_jsonl(path)) == 2
    assert read_jsonl(path)[0]["step"] is None  # no step_getter


def test_stop_is_idempotent_and_works_as_context_manager(tmp_path):
    path = tmp_path / "system.jsonl"
    SystemMonitor(path, 1.0).stop()  # stopping a monitor that never started is a no-op
    assert not path.exists()
    with SystemMonitor(path, 3600) as monitor:
        assert monitor.running
    assert not monitor.running
    monitor.stop()
    monitor.stop()
    assert monitor.samples == 2 == len(read_jsonl(path))


def test_context_manager_stops_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="training failed"):
        with SystemMonitor(tmp_path / "system.jsonl", 3600) as monitor:
            raise RuntimeError("training failed")
    assert not monitor.running
    assert monitor.samples == 2


def test_failing_readings_drop_only_their_fields(tmp_path, monkeypatch):
    import psutil

    def broken(*args, **kwargs):
        raise OSError("no disk stats here")

    def bad_step() -> int:
        raise AttributeError("trainer has no state yet")

    monkeypatch.setattr(psutil, "disk_io_counters", broken)
    path = tmp_path / "system.jsonl"
    with SystemMonitor(path, 3600, step_getter=bad_step) as monitor:
        pass
    records = read_jsonl(path)
    assert len(records) == 2
    for record in records:
        assert "disk_read_bytes" not in record and "disk_write_bytes" not in record
        assert record["step"] is None
        assert CPU_FIELDS | MEMORY_FIELDS <= record.keys()
    assert "disk" in monitor.errors and "step" in monitor.errors


def test_unwritable_path_does_not_raise(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the logs folder should be")
    with SystemMonitor(blocker / "system.jsonl", 3600) as monitor:
        pass
    assert monitor.samples == 0
    assert "write" in monitor.errors


def fake_pynvml(fail_init: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's pynvml module with one GPU."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.calls = []

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        nvml.calls.append("init")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"handle-{index}"
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: f"handle-{uuid}"
    nvml.nvmlDeviceGetName = lambda handle: b"Tesla T4"
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=87, memory=41)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        used=9_000_000_000, total=16_000_000_000, free=7_000_000_000
    )
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 65_432  # milliwatts
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda handle: 70_000

    def temperature(handle, sensor):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # one failing sensor must not drop the others

    nvml.nvmlDeviceGetTemperature = temperature
    return nvml


def test_gpu_fields_from_nvml(tmp_path, monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = tmp_path / "system.jsonl"
    with SystemMonitor(path, 3600, gpu=True, device_index=0):
        pass
    records = read_jsonl(path)
    assert len(records) == 2
    for record in records:
        assert record["gpu_util_percent"] == 87
        assert record["gpu_memory_util_percent"] == 41
        assert record["gpu_memory_used_mb"] == 9000 and record["gpu_memory_total_mb"] == 16000
        assert record["gpu_power_w"] == pytest.approx(65.432, abs=0.01)  # milliwatts -> W
        assert record["gpu_power_limit_w"] == 70
        assert record["gpu_name"] == "Tesla T4"
        assert "gpu_temperature_c" not in record
        assert CPU_FIELDS <= record.keys()
    assert nvml.calls == ["init", "shutdown"]  # initialised once, shut down at stop


def test_nvml_maps_cuda_visible_devices(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert SystemMonitor._find_nvml_handle(nvml, 1) == "handle-1"
    assert SystemMonitor._find_nvml_handle(nvml, 0) == "handle-3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    assert SystemMonitor._find_nvml_handle(nvml, 0) == "handle-GPU-abc"


def test_missing_or_failing_nvml_leaves_gpu_fields_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    path = tmp_path / "system.jsonl"
    with SystemMonitor(path, 3600, gpu=True, device_index=0) as monitor:
        pass
    records = read_jsonl(path)
    assert len(records) == 2
    assert not any(key.startswith("gpu_") for record in records for key in record)
    assert CPU_FIELDS <= records[0].keys()
    assert "nvml" in monitor.errors

    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with SystemMonitor(tmp_path / "other.jsonl", 3600, gpu=True, device_index=0) as monitor:
        pass
    assert monitor.samples == 2
    assert not any(key.startswith("gpu_") for record in read_jsonl(tmp_path / "other.jsonl") for key in record)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_no_gpu_fields_without_cuda(tmp_path):
    path = tmp_path / "system.jsonl"
    with SystemMonitor(path, 3600):
        pass
    for record in read_jsonl(path):
        assert not any(key.startswith(("gpu_", "torch_")) for key in record)


@pytest.mark.gpu
def test_gpu_fields_on_cuda(tmp_path):
    pytest.importorskip("pynvml")
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # initialises CUDA and holds 64 MiB
    path = tmp_path / "system.jsonl"
    with SystemMonitor(path, 3600):
        pass
    del block
    record = read_jsonl(path)[-1]
    assert record["gpu_memory_total_mb"] > record["gpu_memory_used_mb"] > 0
    assert 0 <= record["gpu_util_percent"] <= 100
    assert record["torch_allocated_mb"] >= 64 * 2**20 / 1e6
    assert record["torch_reserved_mb"] >= record["torch_allocated_mb"]


def test_sampling_does_not_import_torch(tmp_path):
    # torch costs seconds to import; a process that never imported it cannot be using CUDA.
    code = (
        "import sys; from gpt2ft.monitor import SystemMonitor; "
        f"m = SystemMonitor({str(tmp_path / 'system.jsonl')!r}, 3600).start(); m.stop(); "
        "assert m.samples == 2, m.errors; assert 'torch' not in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------------------------------------------
# End to end: the shared training run (conftest.trained_run)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(trained_run) -> tuple[dict[str, Path], dict]:
    dirs, printed = trained_run
    return {name: Path(path) for name, path in dirs.items()}, printed


def test_run_writes_system_log(run):
    dirs, printed = run
    records = read_jsonl(dirs["logs"] / "system.jsonl")
    assert len(records) >= 2  # the first sample at start, the last at stop
    for record in records:
        assert isinstance(record["step"], int)
        assert CPU_FIELDS | MEMORY_FIELDS <= record.keys()
    assert records[0]["step"] == 0
    assert records[-1]["step"] == printed["steps"]


def test_run_writes_train_log(run):
    dirs, printed = run
    records = read_jsonl(dirs["logs"] / "train_log.jsonl")
    train_lines = [record for record in records if "loss" in record]
    assert [record["step"] for record in train_lines] == list(range(1, printed["steps"] + 1))
    for record in train_lines:
        assert TRAIN_LINE_FIELDS <= record.keys(), record
    assert train_lines[-1]["tokens_seen"] == printed["train_tokens"]
    eval_lines = [record for record in records if "eval_loss" in record]
    assert eval_lines and all({"eval_loss", "eval_perplexity"} <= record.keys() for record in eval_lines)
    assert any("test_loss" in record for record in records)


def test_run_writes_the_five_charts(run):
    from PIL import Image

    dirs, _ = run
    assert {path.name for path in dirs["images"].iterdir()} == CHARTS
    for name in CHARTS:
        with Image.open(dirs["images"] / name) as image:
            assert image.format == "PNG"
            assert len(image.convert("RGB").getcolors(1 << 20)) > 20


def test_run_model_card_shows_the_metrics(run):
    from gpt2ft.modelcard import format_loss, format_perplexity

    dirs, _ = run
    metrics = json.loads((dirs["logs"] / "metrics.json").read_text(encoding="utf-8"))
    card = (dirs["output"] / "README.md").read_text(encoding="utf-8")
    for split, prefix in (("validation", "eval"), ("test", "test")):
        for label, key in (("the starting model", f"base_{prefix}"), ("fine-tuned", prefix)):
            loss, perplexity = format_loss(metrics[f"{key}_loss"]), format_perplexity(metrics[f"{key}_perplexity"])
            assert f"| {split}, {label} | {loss} | {perplexity} |" in card
    assert format_loss(metrics["train_loss"]) in card
    assert "![training](chart_train.png)" in card
    assert (dirs["output"] / "chart_train.png").is_file()


def test_charts_command_rebuilds_from_the_run_logs(run, tmp_path):
    from gpt2ft.cli import main

    dirs, _ = run
    images = tmp_path / "rebuilt"
    assert main(["charts", "--logs-dir", str(dirs["logs"]), "--images-dir", str(images)]) == 0
    assert {path.name for path in images.iterdir()} == CHARTS
    # The same logs give the same training chart, byte for byte: nothing in it depends on when it was drawn.
    assert (images / "chart_train.png").read_bytes() == (dirs["images"] / "chart_train.png").read_bytes()
