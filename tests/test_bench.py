"""`python -m gpt2ft bench` runs every default variant and reports what it should (no timing is asserted).

    cd /work/main && python -m pytest tests/test_bench.py -q

The tiny fixture model (256-token context) trains for two timed steps per variant, twice, on synthetic dialogues
that are all longer than 128 tokens, so the tutorial recipe must report truncation and padding while gpt2ft reports
none.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import EXCHANGES, make_split, write_layout

from gpt2ft.cli import main

FIELDS = (
    "variant",
    "real_tokens_per_s",
    "padded_tokens",
    "real_tokens",
    "truncated_tokens",
    "step_time_ms",
    "peak_memory_mb",
)


def long_dialogs(n: int, seed: int) -> list[list[str]]:
    """Dialogues of 12 to 30 exchanges: 150 to 450 tiny-tokenizer tokens, past 128 and often past the 256 context."""
    rng = random.Random(seed)
    dialogs = []
    for _ in range(n):
        turns: list[str] = []
        for _ in range(rng.randint(12, 30)):
            turns.extend(rng.choice(EXCHANGES))
        dialogs.append(turns)
    return dialogs


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU two threads wait on each other and the test takes twice as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    splits = {"train": long_dialogs(12, 0), "validation": make_split(4, 1), "test": make_split(4, 2)}
    return write_layout(tmp_path_factory.mktemp("long_dailydialog"), "split_zips", splits)


def run_bench(capsys, model_dir, data, cache, *extra: str) -> list[dict]:
    """Warm-up steps + 2 timed steps of 4 dialogues, from 8 dialogues, each variant twice."""
    argv = [
        "bench",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--dialogs",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--repeats",
        "2",
        "--cache-dir",
        str(cache),
        *extra,
    ]
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_default_variants_report_every_field(capsys, tiny_model_dir, long_data, tmp_path):
    lines = run_bench(capsys, tiny_model_dir, long_data, tmp_path / "cache")
    records = {line["variant"]: line for line in lines if "variant" in line}
    assert list(records) == ["tutorial_pad128", "tutorial_pad512", "gpt2ft_pack", "gpt2ft_pad", "torch_loop"]
    for record in records.values():
        for field in FIELDS:
            assert record.get(field) is not None, f"{record['variant']}: no {field}"
        assert record["steps"] == 2 and record["batch_size"] == 4 and record["real_tokens"] > 0
        # The median of two interleaved repeats, with their spread; warm-up past every shape the timed steps use.
        assert record["repeats"] == 2
        assert record["real_tokens_per_s_min"] <= record["real_tokens_per_s"] <= record["real_tokens_per_s_max"]
        assert record["warmup_steps"] >= 3 and record["shapes"] >= 1

    pad128, pad512 = records["tutorial_pad128"], records["tutorial_pad512"]
    pack, pad, loop = records["gpt2ft_pack"], records["gpt2ft_pad"], records["torch_loop"]
    # The tutorial pads to a fixed length (capped at the fixture's 256-token context) and truncates what is longer.
    assert pad128["padded_tokens"] + pad128["real_tokens"] == 8 * 128
    assert pad512["padded_tokens"] + pad512["real_tokens"] == 8 * 256
    assert pad128["truncated_tokens"] > 0
    assert pad512["padded_tokens"] > 0 and pad512["truncated_tokens"] > 0
    assert pad128["truncated_tokens"] > pad512["truncated_tokens"]
    # The tutorial trains on every slot, padding included; gpt2ft only on real tokens (never a row's leading EOS).
    assert pad128["target_tokens"] == 8 * 127
    for record in (pack, pad):
        assert 0 < record["target_tokens"] < record["real_tokens"]
    # gpt2ft: nothing cut off (long dialogues become windows). 14 windows make 7 rows, 2 a batch: the last batch of
    # each pass has an empty row (the padding of a real epoch is measured in test_step_overhead.py).
    assert pack["truncated_tokens"] == pad["truncated_tokens"] == 0
    assert pack["padded_tokens"] >= 0
    # The bare loop is fed gpt2ft_pack's very batches.
    assert (loop["real_tokens"], loop["padded_tokens"], loop["target_tokens"]) == (
        pack["real_tokens"],
        pack["padded_tokens"],
        pack["target_tokens"],
    )

    ratios = {line["ratio"]: line["value"] for line in lines if "ratio" in line}
    for name in (
        "gpt2ft_pack/tutorial_pad128",
        "gpt2ft_pack/tutorial_pad512",
        "gpt2ft_pack/gpt2ft_pad",
        "gpt2ft_pack/torch_loop",
    ):
        assert ratios[name] > 0
    assert ratios["gpt2ft_pack/torch_loop"] == round(
        pack["real_tokens_per_s"] / loop["real_tokens_per_s"], 3
    )  # medians
    setup = next(line for line in lines if line.get("bench") == "setup")
    assert setup["dialogs"] == 8 and setup["repeats"] == 2


def test_bench_variant_list_and_tokenize(capsys, tiny_model_dir, long_data, tmp_path):
    lines = run_bench(
        capsys,
        tiny_model_dir,
        long_data,
        tmp_path / "cache",
        "--variants",
        "tokenize,gpt2ft_pack_1row,gpt2ft_pack_fp16",
    )
    by_variant = {line["variant"]: line for line in lines if "variant" in line}
    assert by_variant["tokenize"]["dialogs"] == 12 and by_variant["tokenize"]["tokens"] > 12 * 150
    one_row = by_variant["gpt2ft_pack_1row"]
    assert one_row["truncated_tokens"] == 0 and one_row["real_tokens"] > 0 and one_row["shapes"] >= 1
    if not by_variant["gpt2ft_pack_fp16"].get("real_tokens"):
        assert by_variant["gpt2ft_pack_fp16"]["skipped"] == "needs a CUDA GPU"
    assert not [line for line in lines if "ratio" in line]  # no tutorial variant ran


def test_bench_rejects_unknown_variant(capsys, tiny_model_dir, long_data, tmp_path):
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(long_data), "--variants", "gpt2ft_turbo"]
    assert main(argv) == 2
    assert "unknown variant 'gpt2ft_turbo'" in capsys.readouterr().err


def test_the_schedule_counts_what_the_model_is_fed_and_warms_up_every_shape(tiny_tokenizer):
    from gpt2ft.bench import WARMUP_STEPS, gpt2ft_schedule
    from gpt2ft.data import DialogueCollator, dialogs_dataset, tokenize_dialogs

    rows = tokenize_dialogs(dialogs_dataset(make_split(60, 3) + long_dialogs(6, 4)), tiny_tokenizer, 256)
    schedule = gpt2ft_schedule(
        DialogueCollator(tiny_tokenizer, "pack", row_tokens=64), rows, batch_size=4, steps=6, seed=0
    )
    batches = [schedule.collate(schedule.dataset.__getitems__(batch)) for batch in schedule.batches]
    warm, timed = batches[: schedule.warmup], batches[schedule.warmup :]
    assert len(timed) == 6 and schedule.warmup >= WARMUP_STEPS
    timed_shapes = {tuple(b["input_ids"].shape) for b in timed}
    assert timed_shapes <= {tuple(b["input_ids"].shape) for b in warm}  # no shape is new once timing starts
    assert schedule.counts["shapes"] == len(timed_shapes)
    assert schedule.counts["slots"] == sum(b["input_ids"].numel() for b in timed)
    assert schedule.counts["targets"] == sum(int((b["labels"] != -100).sum()) for b in timed)
    # Real tokens: every slot but padding; padding slots all sit at position 0, as does each window's first token.
    windows = [sum(len(row) for row in batch) for batch in schedule.batches[schedule.warmup :]]
    assert schedule.counts["real"] == sum(
        b["input_ids"].numel() - int((b["position_ids"] == 0).sum()) + n for b, n in zip(timed, windows)
    )
