"""Charts: five valid, non-blank PNGs from synthetic logs (with and without GPU fields, or none at all), the
`charts` command, and the helpers that turn log lines into series."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from PIL import Image

from gpt2ft import charts
from gpt2ft.charts import (
    CHART_FILES,
    plot_cpu_disk,
    plot_gpu,
    plot_gpu2,
    plot_length_histogram,
    plot_memory,
    plot_training,
    rates,
    read_jsonl,
    save_figure,
    series_by_step,
    write_charts,
)
from gpt2ft.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GPU_KEYS = {
    "gpu_index": 0,
    "gpu_name": "Tesla T4",
    "gpu_util_percent": 90.0,
    "gpu_memory_util_percent": 40.0,
    "gpu_memory_used_mb": 9000.0,
    "gpu_memory_total_mb": 15835.0,
    "gpu_power_w": 65.0,
    "gpu_power_limit_w": 70.0,
    "gpu_temperature_c": 61.0,
    "torch_allocated_mb": 3000.0,
    "torch_reserved_mb": 8000.0,
    "torch_max_reserved_mb": 8200.0,
}


def train_records(steps: int = 40) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append(
            {
                "step": step,
                "epoch": step / 20,
                "loss": 4.0 * math.exp(-step / 15) + 1.5,
                "grad_norm": 1.0 + (step % 5) / 5,
                "learning_rate": 5e-5 * (1 - step / steps),
                "tokens_seen": step * 2000,
                "tokens_per_s": 1800.0 + step,
                "train_seconds": step * 1.1,
            }
        )
        if step % 20 == 0:
            records.append(
                {
                    "step": step,
                    "epoch": step / 20,
                    "eval_loss": 2.0 - step / 100,
                    "eval_perplexity": math.exp(2.0 - step / 100),
                }
            )
    records.append({"step": steps, "epoch": steps / 20, "test_loss": 1.7, "test_perplexity": math.exp(1.7)})
    return records


def system_records(count: int = 30, gpu: bool = False) -> list[dict]:
    records = []
    for i in range(count):
        record = {
            "timestamp": 1_700_000_000.0 + 2 * i,
            "elapsed_s": 2.0 * i,
            "step": i,
            "cpu_count": 2,
            "process_cpu_percent": 95.0 + i % 7,
            "system_cpu_percent": 50.0 + i % 5,
            "process_rss_mb": 1500.0 + 10 * i,
            "system_ram_used_mb": 4000.0 + 20 * i,
            "system_ram_total_mb": 13000.0,
            "system_ram_percent": 30.0 + i / 10,
            "disk_read_bytes": 10**9 + i * 2 * 10**6,
            "disk_write_bytes": 2 * 10**9 + i * i * 10**5,
            "net_sent_bytes": 10**6 + i * 10**4,
            "net_recv_bytes": 5 * 10**8 + i * 4 * 10**5,
        }
        if gpu:
            record.update(
                {key: (value + i % 9 if isinstance(value, float) else value) for key, value in GPU_KEYS.items()}
            )
        records.append(record)
    return records


def write_logs(folder: Path, train: list[dict] | None, system: list[dict] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("train_log.jsonl", train), ("system.jsonl", system)):
        if records is not None:
            (folder / name).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return folder


def distinct_colours(path: Path) -> int:
    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(1 << 24))


def assert_valid_png(path: Path, min_colours: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800 and height >= 400, (path, image.size)
        extrema = image.convert("L").getextrema()
        assert extrema[0] < 128 < extrema[1] or extrema[0] < 100, f"{path.name} is blank"
    assert distinct_colours(path) >= min_colours, path.name


def figure_texts(figure: Figure) -> str:
    texts = [text.get_text() for axis in figure.axes for text in axis.texts]
    texts += [axis.get_title() for axis in figure.axes]
    texts.append(figure.get_suptitle())
    return "\n".join(texts)


def line_labels(figure: Figure) -> set[str]:
    return {line.get_label() for axis in figure.axes for line in axis.get_lines()}


# --------------------------------------------------------------------------------------------------------------
# The five files
# --------------------------------------------------------------------------------------------------------------


def test_charts_from_gpu_logs(tmp_path):
    import matplotlib.pyplot as plt

    logs = write_logs(tmp_path / "logs", train_records(), system_records(gpu=True))
    figures_before = plt.get_fignums()
    paths = write_charts(logs, tmp_path / "images")
    assert plt.get_fignums() == figures_before  # Figure objects, not pyplot: nothing left open
    assert [path.name for path in paths] == list(CHART_FILES)
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == sorted(CHART_FILES)
    for path in paths:
        # Charts with curves, legends and text are anti-aliased into hundreds of colours.
        assert_valid_png(path, min_colours=200)


def test_charts_from_cpu_logs_say_no_gpu(tmp_path):
    logs = write_logs(tmp_path / "logs", train_records(), system_records(gpu=False))
    paths = {path.name: path for path in write_charts(logs, tmp_path / "images")}
    assert set(paths) == set(CHART_FILES)
    for name in ("chart_train.png", "chart_memory.png", "chart_cpu_disk.png"):
        assert_valid_png(paths[name], min_colours=200)
    for name in ("chart_gpu.png", "chart_gpu2.png"):
        assert_valid_png(paths[name], min_colours=10)  # text only
    records = system_records(gpu=False)
    for plot in (plot_gpu, plot_gpu2):
        assert "No GPU was used" in figure_texts(plot(records))


def test_charts_without_any_logs_draw_nothing_and_leave_the_images_alone(tmp_path, capsys):
    """`charts --logs-dir log` (a typo: no logs there) used to redraw all five charts as empty panels over the run's
    real ones and exit 0. Now it is one line, exit 2, and the images folder is as it was; a panel without data
    still says so."""
    from gpt2ft.cli import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "chart_train.png").write_bytes(b"the run's chart")
    with pytest.raises(DataError, match="no train_log.jsonl or system.jsonl"):
        write_charts(tmp_path / "missing", images)
    assert main(["charts", "--logs-dir", str(tmp_path / "log"), "--images-dir", str(images)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logs-dir" in err[0] and "nothing was drawn" in err[0]
    assert [path.name for path in images.iterdir()] == ["chart_train.png"]
    assert (images / "chart_train.png").read_bytes() == b"the run's chart"
    assert "no data" in figure_texts(plot_training([]))
    assert "no data" in figure_texts(plot_memory([]))
    assert "no data" in figure_texts(plot_cpu_disk([]))
    assert "No GPU data" in figure_texts(plot_gpu([]))


def test_charts_from_empty_and_truncated_logs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_log.jsonl").write_text("", encoding="utf-8")
    lines = "".join(json.dumps(record) + "\n" for record in system_records(5))
    (logs / "system.jsonl").write_text(lines + '{"timestamp": 17000', encoding="utf-8")  # cut mid-line by a crash
    paths = write_charts(logs, tmp_path / "images")
    assert len(paths) == 5 and all(path.is_file() for path in paths)
    assert_valid_png(tmp_path / "images" / "chart_memory.png", min_colours=100)


def test_charts_command_rebuilds_the_files(tmp_path, capsys):
    from gpt2ft.cli import main

    logs = write_logs(tmp_path / "logs", train_records(), system_records(gpu=True))
    images = tmp_path / "images"
    images.mkdir()
    (images / "chart_train.png").write_bytes(b"stale")
    assert main(["charts", "--logs-dir", str(logs), "--images-dir", str(images)]) == 0
    assert sorted(path.name for path in images.iterdir()) == sorted(CHART_FILES)  # no partial files left behind
    for name in CHART_FILES:
        assert_valid_png(images / name, min_colours=200)
    printed = capsys.readouterr().out.split()
    assert sorted(Path(line).name for line in printed) == sorted(CHART_FILES)


# --------------------------------------------------------------------------------------------------------------
# What the figures hold
# --------------------------------------------------------------------------------------------------------------


def test_training_figure_has_every_series():
    figure = plot_training(train_records())
    assert isinstance(figure, Figure)
    assert {"train loss", "eval loss", "test loss", "learning rate", "epoch"} <= line_labels(figure)
    titles = {axis.get_title() for axis in figure.axes}
    assert {"Loss", "Learning rate", "Gradient norm", "Epoch and throughput"} <= titles
    loss_axis = next(axis for axis in figure.axes if axis.get_title() == "Loss")
    assert loss_axis.get_xlabel() == "step" and "loss" in loss_axis.get_ylabel()
    eval_line = next(line for line in loss_axis.get_lines() if line.get_label() == "eval loss")
    assert list(eval_line.get_xdata()) == [20, 40]


def test_gpu_figures_plot_the_gpu_fields():
    records = system_records(gpu=True)
    assert {"GPU busy (kernels running)", "used", "total"} <= line_labels(plot_gpu(records))
    labels = line_labels(plot_gpu2(records))
    assert {"power", "temperature", "allocated (tensors)", "reserved (caching allocator)"} <= labels
    for figure in (plot_gpu(records), plot_gpu2(records)):
        for axis in figure.axes:
            assert axis.get_ylabel() in {"%", "GB", "W", "°C"}
            assert axis.get_xlabel() == "time since start (s)"


def test_memory_and_cpu_figures_convert_units():
    records = system_records(10)
    memory = plot_memory(records)
    rss = next(
        line for axis in memory.axes for line in axis.get_lines() if line.get_label() == "training process (RSS)"
    )
    assert rss.get_ydata()[0] == pytest.approx(1.5)  # 1,500 MB -> 1.5 GB
    cpu_disk = plot_cpu_disk(records)
    read = next(line for axis in cpu_disk.axes for line in axis.get_lines() if line.get_label() == "read")
    assert read.get_ydata()[1] == pytest.approx(1.0)  # 2 MB in 2 s
    assert {axis.get_ylabel() for axis in cpu_disk.axes} == {"%", "MB/s"}


def test_time_axis_unit_follows_the_run_length():
    long_run = [dict(record, timestamp=1_700_000_000.0 + 600 * i) for i, record in enumerate(system_records(10))]
    assert plot_memory(long_run).axes[0].get_xlabel() == "time since start (min)"


def test_length_histogram():
    figure = plot_length_histogram([10, 20, 20, 30, 400], title="Train dialogues", limit=1024)
    axis = figure.axes[0]
    assert sum(patch.get_height() for patch in axis.patches) == 5
    labels = {line.get_label() for line in axis.get_lines()}
    assert {"median: 20", "longest: 400", "limit: 1,024"} <= labels
    assert axis.get_xlabel() == "tokens per dialogue"
    assert "no data" in figure_texts(plot_length_histogram([]))


def test_save_figure_writes_a_png(tmp_path):
    path = save_figure(plot_length_histogram([5, 6, 7]), tmp_path / "deep" / "hist.png")
    assert path == tmp_path / "deep" / "hist.png"
    assert_valid_png(path, min_colours=50)
    assert [p.name for p in path.parent.iterdir()] == ["hist.png"]


# --------------------------------------------------------------------------------------------------------------
# Reading the logs
# --------------------------------------------------------------------------------------------------------------


def test_read_jsonl_tolerates_missing_file_and_truncated_line(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl") == []
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n\n[1, 2]\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_series_by_step_keeps_the_resumed_values():
    records = [
        {"step": 1, "loss": 5.0},
        {"step": 2, "loss": 4.0},
        {"step": 3, "loss": 9.0},
        {"step": 2, "loss": 4.5},
        {"step": 3, "loss": 3.5},
        {"step": 4, "loss": None},
        {"step": 5, "eval_loss": 3.0},
    ]
    assert series_by_step(records, "loss") == ([1, 2, 3], [5.0, 4.5, 3.5])


def test_rates_from_cumulative_counters():
    records = [
        {"timestamp": 0.0, "elapsed_s": 0.0, "disk_read_bytes": 0},
        {"timestamp": 1.0, "elapsed_s": 1.0, "disk_read_bytes": 1_000_000},
        {"timestamp": 3.0, "elapsed_s": 3.0, "disk_read_bytes": 5_000_000},
        {"timestamp": 4.0, "elapsed_s": 4.0, "disk_read_bytes": 100},  # counter reset
        {"timestamp": 5.0, "elapsed_s": 0.0, "disk_read_bytes": 200},  # a resumed run's first sample
        {"timestamp": 6.0, "elapsed_s": 1.0, "disk_read_bytes": 2_000_200},
    ]
    values = rates(records, "disk_read_bytes", 1e6)
    assert math.isnan(values[0]) and math.isnan(values[3]) and math.isnan(values[4])
    assert values[1] == pytest.approx(1.0) and values[2] == pytest.approx(2.0) and values[5] == pytest.approx(2.0)


def test_has_gpu_data():
    assert charts.has_gpu_data(system_records(3, gpu=True))
    assert not charts.has_gpu_data(system_records(3, gpu=False))
    assert not charts.has_gpu_data([{"gpu_util_percent": None}])


# --------------------------------------------------------------------------------------------------------------
# What a person sees (issue 25): nothing drawn that the log does not hold, nothing hidden, nothing cut
# --------------------------------------------------------------------------------------------------------------


def axis_titled(figure: Figure, title: str):
    return next(axis for axis in figure.axes if axis.get_title() == title)


def few_points_log() -> list[dict]:
    """A short run's log as `train` writes it with the default logging_steps (10): the first step, then every
    tenth; a one-step warm-up at learning rate 0; the last eval and the test score at the last step, almost equal."""
    records = [
        {"step": step, "epoch": step / 9, "loss": loss, "grad_norm": 1.2, "learning_rate": lr, "tokens_per_s": 150.0}
        for step, loss, lr in ((1, 6.0, 0.0), (10, 5.56, 2.16e-3), (20, 4.78, 9.6e-4))
    ]
    records += [{"step": step, "epoch": step / 9, "eval_loss": loss} for step, loss in ((9, 5.14), (18, 4.56))]
    records += [{"step": 27, "epoch": 3.0, "eval_loss": 4.366}, {"step": 27, "epoch": 3.0, "test_loss": 4.383}]
    return records


def test_a_sparse_learning_rate_is_marked_where_logged_not_joined_into_a_ramp():
    # Three logged values (0 at step 1, the peak at step 10, then lower): a line through them draws a nine-step
    # warm-up ramp; the schedule between logging steps is not in the log, so only the logged points are marked.
    figure = plot_training(few_points_log())
    lines = axis_titled(figure, "Learning rate").get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[1, 10, 20]]
    assert lines[0].get_linestyle() == "None" and lines[0].get_marker() == "o"
    assert "logged steps" in lines[0].get_label()
    # A dense log (every step) is the schedule itself: drawn as a line.
    dense = axis_titled(plot_training(train_records()), "Learning rate").get_lines()
    assert dense[0].get_linestyle() == "-"


def colour_pixels(figure: Figure, axis, x: float, y: float, colour: tuple[int, int, int], radius: int = 10) -> int:
    """Pixels within `radius` of the data point (x, y) whose colour is close to `colour`, in the drawn figure."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[:, :, :3].astype(int)
    px, py = axis.transData.transform((x, y))
    row, col = image.shape[0] - int(round(py)), int(round(px))
    window = image[row - radius : row + radius + 1, col - radius : col + radius + 1]
    return int((np.abs(window - np.array(colour)).sum(axis=2) < 60).sum())


def test_the_last_eval_dot_is_not_hidden_by_the_test_square():
    orange = (255, 127, 14)  # tab:orange, the eval loss
    records = few_points_log()
    with_test = plot_training(records)
    alone = plot_training([record for record in records if "test_loss" not in record])
    visible = colour_pixels(with_test, axis_titled(with_test, "Loss"), 27, 4.366, orange)
    full = colour_pixels(alone, axis_titled(alone, "Loss"), 27, 4.366, orange)
    assert full > 20 and visible >= 0.9 * full, (visible, full)
    lines = {line.get_label(): line for line in axis_titled(with_test, "Loss").get_lines()}
    assert lines["eval loss"].get_zorder() > lines["test loss"].get_zorder()
    assert lines["test loss"].get_markersize() > lines["eval loss"].get_markersize()  # the square frames the dot


def visible_entries(figure: Figure) -> list[tuple[str, bool]]:
    """(label, shows something) of every legend entry: a line of one point needs a marker to be seen."""
    entries = []
    for axis in figure.axes:
        legend = axis.get_legend()
        if legend is None:
            continue
        lines = {line.get_label(): line for line in axis.get_lines()}
        for text in legend.get_texts():
            line = lines.get(text.get_text())
            if line is None:  # a bar or another artist
                continue
            points = sum(1 for y in line.get_ydata() if math.isfinite(y))
            entries.append(
                (text.get_text(), points >= 2 and line.get_linestyle() != "None" or line.get_marker() != "None")
            )
    return entries


def preference_log() -> tuple[list[dict], dict]:
    """A short DPO run's log: one training log line (its first step), evaluations after each epoch."""
    records = [
        {
            "step": 1,
            "loss": 0.6931,
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/margins": 0.0,
            "rewards/accuracies": 0.0,
        },
    ]
    for step, margin in ((3, 0.0012), (6, 0.0025), (9, 0.0029)):
        records.append(
            {
                "step": step,
                "eval_loss": 0.6925 - margin / 10,
                "eval_rewards/chosen": -0.0001,
                "eval_rewards/rejected": -0.0001 - margin,
                "eval_rewards/margins": margin,
                "eval_rewards/accuracies": 1.0,
            }
        )
    metrics = {
        "algorithm": "dpo",
        "reward_accuracy_before": 0.0,
        "reward_accuracy_after": 1.0,
        "logp_accuracy_before": 1.0,
        "logp_accuracy_after": 1.0,
        "sft_perplexity_before": 123456.78,
        "sft_perplexity_after": 123499.01,
    }
    return records, metrics


def test_every_legend_entry_has_something_drawn_beside_it():
    from gpt2ft.charts import plot_preference

    records, metrics = preference_log()
    for figure in (plot_preference(records, metrics), plot_training(few_points_log())):
        entries = visible_entries(figure)
        assert entries and [label for label, shown in entries if not shown] == []
    # A series with no point at all has no legend entry.
    labels = line_labels(plot_preference([record for record in records if "loss" not in record], metrics))
    assert "train loss" not in labels and "eval loss" in labels


def test_the_preference_chart_keeps_its_text_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gpt2ft.charts import plot_preference

    figure = plot_preference(*preference_log())
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer, frame = canvas.get_renderer(), figure.bbox
    texts = [figure._suptitle] + [text for axis in figure.axes for text in (axis.title, *axis.texts)]
    assert any("123,456.78 -> 123,499.01" in text.get_text() for text in texts)  # the perplexity is still said
    for text in texts:
        if text is None or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()


def test_a_panel_without_data_says_so_instead_of_an_empty_grid():
    # No log at all: every panel says so (none is an empty grid with axes and ticks).
    empty = plot_training([])
    for title in ("Loss", "Learning rate", "Gradient norm", "Epoch and throughput"):
        panel = axis_titled(empty, title)
        assert [text.get_text() for text in panel.texts] == ["no data"] and not panel.get_lines(), title
    # Gradient norms that overflowed (inf at every logged step) leave nothing to draw.
    records = [dict(record, grad_norm=float("inf")) for record in train_records(10)]
    assert "no data" in " ".join(text.get_text() for text in axis_titled(plot_training(records), "Gradient norm").texts)
    # A counter that never moved draws its line along the bottom edge: the panel says what it shows.
    quiet = [dict(record, net_sent_bytes=10**6, net_recv_bytes=5 * 10**8) for record in system_records(10)]
    network = axis_titled(plot_cpu_disk(quiet), "Network throughput (whole machine)")
    assert "0 MB/s throughout" in [text.get_text() for text in network.texts]
    # A preference log with reward accuracies but no margins: the margin panel says so under the accuracy lines.
    records, metrics = preference_log()
    records = [{key: value for key, value in record.items() if "margins" not in key} for record in records]
    from gpt2ft.charts import plot_preference

    margin = axis_titled(plot_preference(records, metrics), "Reward margin (chosen - rejected)")
    assert "no margin logged" in [text.get_text() for text in margin.texts] and not margin.get_lines()
