"""`python -m gpt2ft bench` runs every default variant and reports what it should (no timing is asserted).

    cd /work/main && python -m pytest tests/test_bench.py -q

The tiny fixture model (256-token context) trains for one timed step per variant on synthetic dialogues that are
all longer than 128 tokens, so the tutorial recipe must report truncation and padding while gpt2ft reports none.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import EXCHANGES, make_split, write_layout
from gpt2ft.cli import main

FIELDS = (
    "variant", "real_tokens_per_s", "padded_tokens", "real_tokens", "truncated_tokens", "step_time_ms",
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
    """2 warm-up + 2 timed steps of 4 rows, from 8 dialogues."""
    argv = [
        "bench", "--model", str(model_dir), "--data", str(data), "--dialogs", "8", "--steps", "2",
        "--batch-size", "4", "--cache-dir", str(cache), *extra,
    ]
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_default_variants_report_every_field(capsys, tiny_model_dir, long_data, tmp_path):
    lines = run_bench(capsys, tiny_model_dir, long_data, tmp_path / "cache")
    records = {line["variant"]: line for line in lines if "variant" in line}
    assert list(records) == ["tutorial_pad128", "tutorial_pad512", "gpt2ft_pack", "gpt2ft_pad"]
    for record in records.values():
        for field in FIELDS:
            assert record.get(field) is not None, f"{record['variant']}: no {field}"
        assert record["steps"] == 2 and record["batch_size"] == 4 and record["real_tokens"] > 0

    pad128, pad512 = records["tutorial_pad128"], records["tutorial_pad512"]
    pack, pad = records["gpt2ft_pack"], records["gpt2ft_pad"]
    # The tutorial pads to a fixed length (capped at the fixture's 256-token context) and truncates what is longer.
    assert pad512["max_length"] == 256
    assert pad128["padded_tokens"] + pad128["real_tokens"] == 8 * 128
    assert pad128["truncated_tokens"] > 0
    assert pad512["padded_tokens"] > 0 and pad512["truncated_tokens"] > 0
    assert pad128["truncated_tokens"] > pad512["truncated_tokens"]
    # The tutorial trains on every slot, padding included; gpt2ft only on real tokens.
    assert pad128["target_tokens"] == 8 * 127
    # gpt2ft never trains on padding nor on each row's leading EOS (2 timed steps x 4 rows); windows after a long
    # dialogue's first also repeat earlier turns as context only.
    for record in (pack, pad):
        assert 0 < record["target_tokens"] <= record["real_tokens"] - 8
    # gpt2ft: nothing cut off (long dialogues become windows). Packing into rows of ~512 tokens pads only to even
    # the rows up (one row per batch pads nothing: see the next test).
    assert pack["truncated_tokens"] == pad["truncated_tokens"] == 0
    assert 0 <= pack["padded_tokens"] < pack["real_tokens"] / 4

    ratios = {line["ratio"]: line["value"] for line in lines if "ratio" in line}
    for name in ("gpt2ft_pack/tutorial_pad128", "gpt2ft_pack/tutorial_pad512", "gpt2ft_pack/gpt2ft_pad"):
        assert ratios[name] > 0
    setup = next(line for line in lines if line.get("bench") == "setup")
    assert setup["dialogs"] == 8 and setup["warmup_steps"] >= 1


def test_bench_variant_list_and_tokenize(capsys, tiny_model_dir, long_data, tmp_path):
    lines = run_bench(
        capsys, tiny_model_dir, long_data, tmp_path / "cache", "--variants", "tokenize,gpt2ft_pack_1row,gpt2ft_pack_fp16"
    )
    by_variant = {line["variant"]: line for line in lines if "variant" in line}
    assert by_variant["tokenize"]["dialogs"] == 12 and by_variant["tokenize"]["tokens"] > 12 * 150
    one_row = by_variant["gpt2ft_pack_1row"]
    assert one_row["padded_tokens"] == 0 and one_row["truncated_tokens"] == 0 and one_row["real_tokens"] > 0
    if not by_variant["gpt2ft_pack_fp16"].get("real_tokens"):
        assert by_variant["gpt2ft_pack_fp16"]["skipped"] == "needs a CUDA GPU"
    assert not [line for line in lines if "ratio" in line]  # no tutorial variant ran


def test_bench_rejects_unknown_variant(capsys, tiny_model_dir, long_data, tmp_path):
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(long_data), "--variants", "gpt2ft_turbo"]
    assert main(argv) == 2
    assert "unknown variant 'gpt2ft_turbo'" in capsys.readouterr().err
