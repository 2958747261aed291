"""Charts of a run, drawn from its JSONL logs: training curves and system usage, as five PNG files.

    python -m gpt2ft charts --logs-dir logs --images-dir images     # train() also calls write_charts at the end

Reads `train_log.jsonl` (loss, learning rate, grad norm, epoch; eval and test loss) and `system.jsonl` (written
by gpt2ft.monitor.SystemMonitor) and writes chart_train.png, chart_gpu.png, chart_gpu2.png, chart_memory.png and
chart_cpu_disk.png. Missing or empty logs still give all five files, saying "no data" (or that no GPU was used).

Drawing (`plot_*`, which return a matplotlib Figure) is kept apart from saving (`save_figure`), so the notebook
can show a figure inline. Figures are built with `matplotlib.figure.Figure`, not pyplot: no global state, no GUI
backend, nothing to close.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import DataError
from .logs import as_float, percentile, read_jsonl

TRAIN_LOG = "train_log.jsonl"
SYSTEM_LOG = "system.jsonl"
CHART_FILES = ("chart_train.png", "chart_gpu.png", "chart_gpu2.png", "chart_memory.png", "chart_cpu_disk.png")
GPU_FIELDS = (
    "gpu_util_percent",
    "gpu_memory_used_mb",
    "gpu_power_w",
    "gpu_temperature_c",
    "torch_allocated_mb",
    "torch_reserved_mb",
)
DPI = 100
SPARSE_POINTS = 20  # a series with at most this many points is marked point by point
NAN = float("nan")
MB_PER_GB = 1000.0  # the monitor logs MB of 10**6 bytes


# --------------------------------------------------------------------------------------------------------------
# Reading the logs
# --------------------------------------------------------------------------------------------------------------


def series_by_step(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step. A step logged twice keeps its last value: a resumed run appends
    to the log and repeats the steps after its checkpoint."""
    by_step: dict[float, float] = {}
    for record in records:
        step, value = as_float(record.get("step")), as_float(record.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def has_gpu_data(records: Sequence[dict[str, Any]]) -> bool:
    """True when some system sample holds a GPU reading."""
    return any(as_float(record.get(key)) is not None for record in records for key in GPU_FIELDS)


def time_axis(records: Sequence[dict[str, Any]]) -> tuple[list[float], str]:
    """Time of each sample since the first one, in a unit that suits the run's length, and the axis label.

    Wall-clock timestamps, not elapsed_s, so that a resumed run (whose monitor restarts at 0) continues to the right.
    """
    stamps = [as_float(record.get("timestamp")) for record in records]
    if any(stamp is None for stamp in stamps):
        stamps = [as_float(record.get("elapsed_s")) for record in records]
    seconds = [NAN if stamp is None else stamp for stamp in stamps]
    finite = [value for value in seconds if math.isfinite(value)]
    origin = min(finite) if finite else 0.0
    span = (max(finite) - origin) if finite else 0.0
    scale, unit = (1.0, "s") if span < 180 else (60.0, "min") if span < 3 * 3600 else (3600.0, "h")
    return [(value - origin) / scale for value in seconds], f"time since start ({unit})"


def session_breaks(records: Sequence[dict[str, Any]]) -> list[bool]:
    """True at each sample that starts a new monitor session (its elapsed_s went down)."""
    breaks, previous = [], None
    for record in records:
        elapsed = as_float(record.get("elapsed_s"))
        breaks.append(previous is not None and elapsed is not None and elapsed < previous)
        previous = elapsed if elapsed is not None else previous
    return breaks


def field_values(records: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    """The values of `key` divided by `scale`, NaN where missing (matplotlib leaves a gap there)."""
    values = [as_float(record.get(key)) for record in records]
    return [NAN if value is None else value / scale for value in values]


def rates(records: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    """Per-second rate of a cumulative counter between consecutive samples, divided by `scale`.

    The first sample of each session has no predecessor (NaN); so has a sample after a counter reset (a
    negative difference) or a clock that did not move.
    """
    times = [as_float(record.get("timestamp")) for record in records]
    counts = [as_float(record.get(key)) for record in records]
    breaks = session_breaks(records)
    values = [NAN]
    for i in range(1, len(records)):
        t0, t1, c0, c1 = times[i - 1], times[i], counts[i - 1], counts[i]
        if breaks[i] or None in (t0, t1, c0, c1) or t1 <= t0 or c1 < c0:
            values.append(NAN)
        else:
            values.append((c1 - c0) / (t1 - t0) / scale)
    return values[: len(records)]


def _any_finite(values: Iterable[float]) -> bool:
    return any(math.isfinite(value) for value in values)


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------------------------


def _new_figure(rows: int, cols: int, title: str, width: float = 12.0, height: float = 8.0) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    figure.suptitle(title, fontsize=14, fontweight="bold")
    return figure, axes


def _no_data(axis: Any, message: str = "no data", title: str | None = None) -> None:
    if title:
        axis.set_title(title)
    axis.text(
        0.5, 0.5, message, ha="center", va="center", fontsize=13, color="0.35", transform=axis.transAxes, wrap=True
    )
    axis.set_xticks([])
    axis.set_yticks([])


def _say_no_data_behind(axis: Any, message: str) -> None:
    """A panel whose own series are empty but that still carries a twin axis's lines: the message, under them."""
    axis.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="0.35", transform=axis.transAxes)
    axis.set_yticks([])


def _finite_points(xs: Sequence[float], ys: Sequence[float]) -> int:
    return sum(1 for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y))


def _plot_series(axis: Any, xs: Sequence[float], ys: Sequence[float], fmt: str = "", **style: Any) -> list[Any]:
    """Plot one logged series; nothing (and no legend entry) when it has no finite point.

    A series of few points gets a marker at each (a single point drawn as a bare line would be invisible, leaving a
    legend entry with nothing beside it).
    """
    points = _finite_points(xs, ys)
    if points == 0:
        return []
    if points <= SPARSE_POINTS and not any(char in fmt for char in "o.sD^v*") and "marker" not in style:
        style = {"marker": "o", "markersize": 4, **style}
    return axis.plot(xs, ys, fmt, **style) if fmt else axis.plot(xs, ys, **style)


def _plot_schedule(axis: Any, steps: Sequence[float], values: Sequence[float], label: str, color: str) -> list[Any]:
    """The learning rate at the logged steps. Between logging steps the schedule is not in the log: with few points,
    a line between them would draw a ramp (a warm-up of many steps, say) that did not happen, so only the logged
    values are marked; a dense log is drawn as a line, which is then the schedule itself."""
    points = _finite_points(steps, values)
    if points == 0:
        return []
    if points <= SPARSE_POINTS:
        return axis.plot(steps, values, "o", color=color, markersize=6, label=f"{label} (at the logged steps)")
    return axis.plot(steps, values, color=color, label=label)


def _finish(axis: Any, title: str, xlabel: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="best", fontsize=9)


Line = tuple[str, Sequence[float], dict[str, Any]]  # label, values, matplotlib style


def _plot_lines(axis: Any, x: Sequence[float], lines: Sequence[Line], breaks: Sequence[bool]) -> bool:
    """Draw each (label, values, style) against x, cutting the line at session breaks. False when all are empty."""
    drawn = False
    for label, values, style in lines:
        if not _any_finite(values):
            continue
        xs, ys = [], []
        for xv, yv, new_session in zip(x, values, breaks):
            if new_session:
                xs.append(NAN)
                ys.append(NAN)
            xs.append(xv)
            ys.append(yv)
        axis.plot(xs, ys, label=label, **style)
        drawn = True
    return drawn


def _system_panel(
    axis: Any,
    records: Sequence[dict[str, Any]],
    x: Sequence[float],
    xlabel: str,
    title: str,
    ylabel: str,
    lines: Sequence[Line],
    empty: str = "no data",
    ylim: tuple[float, float] | None = None,
) -> None:
    if _plot_lines(axis, x, lines, session_breaks(records)):
        _finish(axis, title, xlabel, ylabel)
        if ylim is not None:
            axis.set_ylim(*ylim)
        if all(value == 0 for _, values, _ in lines for value in values if math.isfinite(value)):
            # A line along the bottom edge reads as an empty panel: say what it shows.
            axis.text(
                0.5,
                0.5,
                f"0 {ylabel} throughout",
                ha="center",
                va="center",
                fontsize=13,
                color="0.35",
                transform=axis.transAxes,
            )
    else:
        _no_data(axis, empty)
        axis.set_title(title)


def _from_zero(*axes: Any) -> None:
    """Start the y axis at 0, with headroom so a line at the maximum (a limit, a total) stays visible."""
    for axis in axes:
        if axis.has_data():
            top = axis.dataLim.y1
            axis.set_ylim(0, top * 1.08 if math.isfinite(top) and top > 0 else 1.0)


def _same_x(axes: Sequence[Any], x: Sequence[float]) -> None:
    """One time range on every panel of a figure: a rate has no value at the first sample, and panels that start
    at different times would be misread side by side."""
    finite = [value for value in x if math.isfinite(value)]
    if len(finite) > 1 and max(finite) > min(finite):
        pad = 0.02 * (max(finite) - min(finite))
        for axis in axes:
            if axis.has_data():
                axis.set_xlim(min(finite) - pad, max(finite) + pad)


def _no_gpu_figure(title: str, records: Sequence[dict[str, Any]]) -> Figure:
    figure, (axis,) = _new_figure(1, 1, title, height=5.0)
    if records:
        message = "No GPU was used in this run\n(the system samples hold no GPU readings)"
    else:
        message = "No GPU data: system.jsonl is missing or empty"
    _no_data(axis, message)
    axis.set_frame_on(False)
    return figure


# --------------------------------------------------------------------------------------------------------------
# The five charts
# --------------------------------------------------------------------------------------------------------------


def plot_training(records: Sequence[dict[str, Any]]) -> Figure:
    """2x2 grid from train_log.jsonl records: train/eval/test loss, learning rate, gradient norm, epoch and
    throughput, all against the optimiser step."""
    figure, (loss_ax, lr_ax, grad_ax, epoch_ax) = _new_figure(2, 2, "Training")
    steps, loss = series_by_step(records, "loss")
    eval_steps, eval_loss = series_by_step(records, "eval_loss")
    test_steps, test_loss = series_by_step(records, "test_loss")
    # The test square is drawn first, larger and hollow, and the eval dot on top of it: the final eval and test
    # losses usually sit at the same step and almost the same value, and neither may hide the other.
    drawn = _plot_series(
        loss_ax,
        test_steps,
        test_loss,
        "s",
        label="test loss",
        color="tab:red",
        markersize=14,
        markerfacecolor="none",
        markeredgewidth=1.5,
        zorder=3,
        clip_on=False,  # at the last step, on the panel's edge: drawn whole
    )
    drawn += _plot_series(loss_ax, steps, loss, label="train loss", color="tab:blue", linewidth=1.2, zorder=2)
    drawn += _plot_series(
        loss_ax,
        eval_steps,
        eval_loss,
        "o-",
        label="eval loss",
        color="tab:orange",
        markersize=5,
        zorder=4,
        clip_on=False,
    )
    if drawn:
        loss_ax.margins(y=0.08)  # room for the markers at the lowest and highest loss
        _finish(loss_ax, "Loss", "step", "loss (nats per target token)")
        order = {"train loss": 0, "eval loss": 1, "test loss": 2}
        loss_ax.legend(handles=sorted(drawn, key=lambda line: order[line.get_label()]), loc="best", fontsize=9)
    else:
        _no_data(loss_ax, title="Loss")

    lr_steps, lr = series_by_step(records, "learning_rate")
    if _plot_schedule(lr_ax, lr_steps, lr, "learning rate", "tab:green"):
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        _finish(lr_ax, "Learning rate", "step", "learning rate")
    else:
        _no_data(lr_ax, title="Learning rate")

    grad_steps, grad = series_by_step(records, "grad_norm")
    if _plot_series(grad_ax, grad_steps, grad, color="tab:purple", linewidth=1.0, label="grad norm (before clipping)"):
        _finish(grad_ax, "Gradient norm", "step", "L2 norm")
    else:
        _no_data(grad_ax, title="Gradient norm")

    epoch_steps, epoch = series_by_step([r for r in records if "loss" in r or "eval_loss" in r], "epoch")
    speed_steps, speed = series_by_step([r for r in records if "loss" in r], "tokens_per_s")
    if _finite_points(epoch_steps, epoch) or _finite_points(speed_steps, speed):
        handles = _plot_series(epoch_ax, epoch_steps, epoch, color="tab:brown", label="epoch")
        if handles:
            epoch_ax.set_ylabel("epoch")
        else:
            _say_no_data_behind(epoch_ax, "no epoch data")
        if _finite_points(speed_steps, speed):
            speed_ax = epoch_ax.twinx()
            handles += _plot_series(
                speed_ax, speed_steps, speed, color="tab:cyan", linestyle="--", label="tokens/s (mean so far)"
            )
            speed_ax.set_ylabel("target tokens per second")
            _from_zero(speed_ax)
        _from_zero(epoch_ax)
        epoch_ax.set_title("Epoch and throughput")
        epoch_ax.set_xlabel("step")
        epoch_ax.grid(True, alpha=0.3)
        epoch_ax.legend(handles=handles, loc="lower right", fontsize=9)
    else:
        _no_data(epoch_ax, title="Epoch and throughput")
    # Every panel spans the whole run (eval lines extend it past the last logged train step); steps are whole.
    _same_x(
        [loss_ax, lr_ax, grad_ax, epoch_ax], [s for s in (as_float(r.get("step")) for r in records) if s is not None]
    )
    for axis in (loss_ax, lr_ax, grad_ax, epoch_ax):
        if axis.has_data():
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not records:
        figure.suptitle("Training (no data: train_log.jsonl is missing or empty)", fontsize=14, fontweight="bold")
    return figure


def plot_gpu(records: Sequence[dict[str, Any]]) -> Figure:
    """GPU utilisation and GPU memory over time, from system.jsonl records."""
    if not has_gpu_data(records):
        return _no_gpu_figure("GPU utilisation and memory", records)
    figure, (util_ax, memory_ax) = _new_figure(2, 1, "GPU utilisation and memory")
    x, xlabel = time_axis(records)
    _system_panel(
        util_ax,
        records,
        x,
        xlabel,
        "GPU utilisation",
        "%",
        [
            ("GPU busy (kernels running)", field_values(records, "gpu_util_percent"), {"color": "tab:green"}),
            (
                "memory controller busy",
                field_values(records, "gpu_memory_util_percent"),
                {"color": "tab:olive", "alpha": 0.7},
            ),
        ],
        ylim=(0, 105),
    )
    _system_panel(
        memory_ax,
        records,
        x,
        xlabel,
        "GPU memory (whole device, NVML)",
        "GB",
        [
            ("used", field_values(records, "gpu_memory_used_mb", MB_PER_GB), {"color": "tab:blue"}),
            ("total", field_values(records, "gpu_memory_total_mb", MB_PER_GB), {"color": "black", "linestyle": "--"}),
        ],
    )
    _from_zero(memory_ax)
    _same_x([util_ax, memory_ax], x)
    return figure


def plot_gpu2(records: Sequence[dict[str, Any]]) -> Figure:
    """GPU power, temperature, and torch's allocated vs reserved memory over time, from system.jsonl records."""
    if not has_gpu_data(records):
        return _no_gpu_figure("GPU power, temperature and PyTorch memory", records)
    figure, (power_ax, temp_ax, torch_ax) = _new_figure(3, 1, "GPU power, temperature and PyTorch memory", height=10.0)
    x, xlabel = time_axis(records)
    _system_panel(
        power_ax,
        records,
        x,
        xlabel,
        "GPU power draw",
        "W",
        [
            ("power", field_values(records, "gpu_power_w"), {"color": "tab:red"}),
            ("power limit", field_values(records, "gpu_power_limit_w"), {"color": "black", "linestyle": "--"}),
        ],
    )
    _system_panel(
        temp_ax,
        records,
        x,
        xlabel,
        "GPU temperature",
        "°C",
        [("temperature", field_values(records, "gpu_temperature_c"), {"color": "tab:orange"})],
    )
    _system_panel(
        torch_ax,
        records,
        x,
        xlabel,
        "PyTorch CUDA memory (this process)",
        "GB",
        [
            ("allocated (tensors)", field_values(records, "torch_allocated_mb", MB_PER_GB), {"color": "tab:blue"}),
            (
                "reserved (caching allocator)",
                field_values(records, "torch_reserved_mb", MB_PER_GB),
                {"color": "tab:purple"},
            ),
            (
                "peak reserved",
                field_values(records, "torch_max_reserved_mb", MB_PER_GB),
                {"color": "tab:gray", "linestyle": ":"},
            ),
        ],
        empty="no data (torch.cuda was not initialised)",
    )
    _from_zero(power_ax, torch_ax)
    _same_x([power_ax, temp_ax, torch_ax], x)
    return figure


def plot_memory(records: Sequence[dict[str, Any]]) -> Figure:
    """Process RSS and system RAM (used and total) over time, from system.jsonl records."""
    figure, (axis,) = _new_figure(1, 1, "Memory (RAM)", height=5.5)
    x, xlabel = time_axis(records)
    _system_panel(
        axis,
        records,
        x,
        xlabel,
        "Training process and whole machine",
        "GB",
        [
            ("training process (RSS)", field_values(records, "process_rss_mb", MB_PER_GB), {"color": "tab:blue"}),
            ("system used", field_values(records, "system_ram_used_mb", MB_PER_GB), {"color": "tab:orange"}),
            (
                "system total",
                field_values(records, "system_ram_total_mb", MB_PER_GB),
                {"color": "black", "linestyle": "--"},
            ),
        ],
        empty="no data (system.jsonl is missing or empty)",
    )
    _from_zero(axis)
    return figure


def plot_cpu_disk(records: Sequence[dict[str, Any]]) -> Figure:
    """CPU %, disk read/write and network send/receive throughput over time, from system.jsonl records."""
    figure, (cpu_ax, disk_ax, net_ax) = _new_figure(3, 1, "CPU, disk and network", height=10.0)
    x, xlabel = time_axis(records)
    cores = max((as_float(r.get("cpu_count")) or 0 for r in records), default=0)
    process_label = "training process (100 % = one core" + (f" of {int(cores)})" if cores else ")")
    _system_panel(
        cpu_ax,
        records,
        x,
        xlabel,
        "CPU",
        "%",
        [
            (process_label, field_values(records, "process_cpu_percent"), {"color": "tab:blue"}),
            ("system (100 % = all cores)", field_values(records, "system_cpu_percent"), {"color": "tab:orange"}),
        ],
        empty="no data (system.jsonl is missing or empty)",
    )
    _system_panel(
        disk_ax,
        records,
        x,
        xlabel,
        "Disk throughput (whole machine)",
        "MB/s",
        [
            ("read", rates(records, "disk_read_bytes", 1e6), {"color": "tab:green"}),
            ("write", rates(records, "disk_write_bytes", 1e6), {"color": "tab:red"}),
        ],
        empty="no data (needs two samples with disk counters)",
    )
    _system_panel(
        net_ax,
        records,
        x,
        xlabel,
        "Network throughput (whole machine)",
        "MB/s",
        [
            ("received", rates(records, "net_recv_bytes", 1e6), {"color": "tab:purple"}),
            ("sent", rates(records, "net_sent_bytes", 1e6), {"color": "tab:brown"}),
        ],
        empty="no data (needs two samples with network counters)",
    )
    _from_zero(cpu_ax, disk_ax, net_ax)
    _same_x([cpu_ax, disk_ax, net_ax], x)
    return figure


def plot_length_histogram(
    lengths: Sequence[int], title: str = "Dialogue length", limit: int | None = None, bins: int = 50
) -> Figure:
    """Histogram of token counts (one a dialogue), with the median, 99th percentile and, if given, a `limit`
    (e.g. the context length) marked."""
    figure, (axis,) = _new_figure(1, 1, title, width=10.0, height=5.0)
    values = sorted(int(v) for v in lengths)
    if not values:
        _no_data(axis)
        return figure
    axis.hist(
        values,
        bins=min(bins, max(1, len(set(values)))),
        color="tab:blue",
        alpha=0.8,
        label=f"{len(values):,} dialogues",
    )

    for value, label, style in (
        (percentile(values, 0.5), "median", "--"),
        (percentile(values, 0.99), "99th percentile", ":"),
        (values[-1], "longest", "-."),
    ):
        axis.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{label}: {value:,}")
    if limit is not None:
        axis.axvline(limit, color="tab:red", linewidth=1.5, label=f"limit: {limit:,}")
    _finish(axis, f"mean {sum(values) / len(values):,.1f} tokens", "tokens per dialogue", "dialogues")
    return figure


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG; the file appears whole or not at all (written aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        figure.savefig(partial, format="png", dpi=DPI)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_charts(logs_dir: str | Path, images_dir: str | Path) -> list[Path]:
    """Draw the five charts from `logs_dir`'s train_log.jsonl and system.jsonl into `images_dir`.

    Returns:
        The paths written, in the order of CHART_FILES.

    Raises:
        DataError: neither log has a record (nothing is written).
    """
    logs, images = Path(logs_dir), Path(images_dir)
    train_records = read_jsonl(logs / TRAIN_LOG)
    system_records = read_jsonl(logs / SYSTEM_LOG)
    if not train_records and not system_records:
        # A typo'd folder must not redraw every chart as empty panels over the run's real ones.
        raise DataError(
            f"--logs-dir {logs_dir}: no {TRAIN_LOG} or {SYSTEM_LOG} records there (a train or prefer run writes them "
            f"to its --logs-dir); nothing was drawn, and {images_dir} was left as it was"
        )
    figures = (
        plot_training(train_records),
        plot_gpu(system_records),
        plot_gpu2(system_records),
        plot_memory(system_records),
        plot_cpu_disk(system_records),
    )
    return [save_figure(figure, images / name) for figure, name in zip(figures, CHART_FILES)]


# --------------------------------------------------------------------------------------------------------------
# Preference tuning (python -m gpt2ft prefer)
# --------------------------------------------------------------------------------------------------------------

PREFER_CHART = "chart_prefer.png"
METRICS_FILE = "metrics.json"


def plot_preference(records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> Figure:
    """2x2 grid of a preference run: the DPO/KTO loss, the implicit rewards of the chosen and rejected replies, their
    margin and accuracy (TRL's per-step logs, from train_log.jsonl), and the held-out scores and supervised perplexity
    before and after (metrics.json)."""
    algorithm = str(metrics.get("algorithm") or "preference").upper()
    figure, (loss_ax, reward_ax, margin_ax, summary_ax) = _new_figure(2, 2, f"Preference tuning ({algorithm})")
    train = [record for record in records if "loss" in record]
    evals = [record for record in records if "eval_loss" in record]
    lines = {
        loss_ax: [
            ("train loss", train, "loss", "tab:blue", "-"),
            ("eval loss", evals, "eval_loss", "tab:orange", "o-"),
        ],
        reward_ax: [
            ("chosen (train)", train, "rewards/chosen", "tab:green", "-"),
            ("rejected (train)", train, "rewards/rejected", "tab:red", "-"),
            ("chosen (eval)", evals, "eval_rewards/chosen", "tab:green", "o--"),
            ("rejected (eval)", evals, "eval_rewards/rejected", "tab:red", "o--"),
        ],
        margin_ax: [
            ("margin (train)", train, "rewards/margins", "tab:purple", "-"),
            ("margin (eval)", evals, "eval_rewards/margins", "tab:purple", "o--"),
        ],
    }
    titles = {
        loss_ax: ("Loss", "loss"),
        reward_ax: ("Implicit reward: beta * log(pi / pi_ref)", "reward"),
        margin_ax: ("Reward margin (chosen - rejected)", "reward"),
    }
    accuracy_steps, accuracy = series_by_step(train, "rewards/accuracies")
    eval_steps, eval_accuracy = series_by_step(evals, "eval_rewards/accuracies")
    has_accuracy = bool(_finite_points(accuracy_steps, accuracy) or _finite_points(eval_steps, eval_accuracy))
    for axis, specs in lines.items():
        drawn = []
        for label, subset, key, color, style in specs:
            steps, values = series_by_step(subset, key)
            drawn += _plot_series(axis, steps, values, style, label=label, color=color, linewidth=1.2, markersize=5)
        if drawn:
            _finish(axis, titles[axis][0], "step", titles[axis][1])
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif axis is margin_ax and has_accuracy:
            axis.set_title(titles[axis][0])
            axis.set_xlabel("step")
            _say_no_data_behind(axis, "no margin logged")
        else:
            _no_data(axis, title=titles[axis][0])
    if has_accuracy:
        twin = margin_ax.twinx()
        _plot_series(
            twin, accuracy_steps, accuracy, color="tab:gray", linewidth=1.0, alpha=0.7, label="reward accuracy (train)"
        )
        _plot_series(
            twin, eval_steps, eval_accuracy, "s--", color="black", markersize=5, label="reward accuracy (eval)"
        )
        twin.set_ylim(-0.02, 1.02)
        twin.set_ylabel("reward accuracy")
        twin.legend(loc="lower right", fontsize=9)

    bars = [
        (label, as_float(metrics.get(f"{key}_before")), as_float(metrics.get(f"{key}_after")))
        for key, label in (("reward_accuracy", "reward accuracy"), ("logp_accuracy", "model prefers chosen"))
        if as_float(metrics.get(f"{key}_after")) is not None
    ]
    title = "Held-out, before and after"
    if bars:
        positions = range(len(bars))
        before = [NAN if b is None else b for _, b, _ in bars]
        after = [NAN if a is None else a for _, _, a in bars]
        summary_ax.bar([p - 0.2 for p in positions], before, width=0.4, label="before", color="tab:gray")
        summary_ax.bar([p + 0.2 for p in positions], after, width=0.4, label="after", color="tab:blue")
        for position, value in [(p - 0.2, v) for p, v in zip(positions, before)] + [
            (p + 0.2, v) for p, v in zip(positions, after)
        ]:
            if math.isfinite(value):
                summary_ax.text(position, value + 0.02, f"{value:.2f}", ha="center", fontsize=9)
        summary_ax.set_xticks(list(positions), [label for label, _, _ in bars])
        summary_ax.set_ylim(0, 1.3)  # room above the bars for the perplexity line
        summary_ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        before_ppl, after_ppl = (
            as_float(metrics.get("sft_perplexity_before")),
            as_float(metrics.get("sft_perplexity_after")),
        )
        _finish(summary_ax, title, "", "share of held-out records")
        if before_ppl is not None and after_ppl is not None:
            # Inside the panel, on a line of its own (not a second title line): a title longer than its panel runs
            # past the figure's edge and is cut.
            summary_ax.text(
                0.5,
                0.97,
                f"supervised validation perplexity\n{before_ppl:,.2f} -> {after_ppl:,.2f}",
                transform=summary_ax.transAxes,
                ha="center",
                va="top",
                fontsize=10,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8"},
            )
        summary_ax.legend(loc="upper left", fontsize=9)
    else:
        _no_data(summary_ax, "no held-out scores (metrics.json is missing)", title=title)
    if not records:
        figure.suptitle(
            f"Preference tuning ({algorithm}; no data: train_log.jsonl is missing or empty)",
            fontsize=14,
            fontweight="bold",
        )
    return figure


def write_preference_chart(logs_dir: str | Path, images_dir: str | Path) -> Path:
    """Draw chart_prefer.png from `logs_dir`'s train_log.jsonl and metrics.json into `images_dir`."""
    logs = Path(logs_dir)
    try:
        metrics = json.loads((logs / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    return save_figure(
        plot_preference(read_jsonl(logs / TRAIN_LOG), metrics if isinstance(metrics, dict) else {}),
        Path(images_dir) / PREFER_CHART,
    )


def is_preference_run(logs_dir: str | Path) -> bool:
    """True when `logs_dir` holds the logs of a preference run (its metrics.json says stage "prefer")."""
    try:
        return json.loads((Path(logs_dir) / METRICS_FILE).read_text(encoding="utf-8")).get("stage") == "prefer"
    except (OSError, ValueError, AttributeError):
        return False


CONTROL_CHART = "chart_control.png"


def plot_control(control: dict[str, Any]) -> Figure:
    """Control accuracy per label (evaluation.evaluate_control): for each field, a bar per label for how often the
    judge found the label asked for, beside how often it finds that label in replies asked for nothing (chance),
    with the random rate as a line."""
    fields = list(control.get("fields") or {})
    figure, axes = _new_figure(
        1, max(1, len(fields)), "Replies in the label asked for", width=6.0 * max(1, len(fields)), height=4.8
    )
    if not fields:
        _no_data(axes[0], "no controls measured", "Control accuracy")
        return figure
    for axis, name in zip(axes, fields):
        result = control["fields"][name]
        labels = list(result["accuracy"])
        positions = range(len(labels))
        asked = [result["accuracy"][label] or 0.0 for label in labels]
        chance = [result["chance"].get(label) or 0.0 for label in labels]
        axis.bar([p - 0.2 for p in positions], asked, width=0.4, color="tab:blue", label="asked for")
        axis.bar([p + 0.2 for p in positions], chance, width=0.4, color="tab:gray", label="asked for nothing")
        axis.axhline(result["random"], color="tab:red", linestyle="--", label=f"random ({result['random']:.2f})")
        axis.set_xticks(list(positions), labels, rotation=30, ha="right")
        axis.set_ylim(0, 1.05)
        macro = result.get("macro_accuracy")
        _finish(
            axis,
            f"{name}: macro accuracy {macro:.2f}" if macro is not None else name,
            "label asked for",
            "share of replies the judge finds in it",
        )
    return figure


def write_control_chart(logs_dir: str | Path, images_dir: str | Path) -> Path | None:
    """Draw chart_control.png from metrics.json's control results; None when the run measured no controls."""
    try:
        metrics = json.loads((Path(logs_dir) / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    control = metrics.get("control") if isinstance(metrics, dict) else None
    if not control:
        return None
    return save_figure(plot_control(control), Path(images_dir) / CONTROL_CHART)
