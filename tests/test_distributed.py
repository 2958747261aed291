"""A real two-process data-parallel run on CPU (torchrun, gloo) of the tiny fixture model on synthetic data.

    python -m pytest tests/test_distributed.py -q

It checks what data parallelism must not break: the run completes, shards the data (half the steps of one
process), writes one model folder and one set of logs (the main process only), prints the metrics once, and its
token-weighted eval loss (all-reduced across the two processes) equals a single-process evaluation of the saved
model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import batches_per_epoch, read_jsonl, train_argv

from gpt2ft import cli

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8  # train_argv's --batch-size
NPROC = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform.startswith("linux"):
        # gloo otherwise picks its network interface by resolving the host name, which can fail offline.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def test_two_process_cpu_run(tiny_model_dir, dailydialog_dir, run_dirs, tmp_path, capsys):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        f"--nproc-per-node={NPROC}",
        "--master-addr",
        "127.0.0.1",
        f"--master-port={free_port()}",
        "--max-restarts",
        "0",
        "-m",
        "gpt2ft",
        *train_argv(tiny_model_dir, dailydialog_dir, run_dirs, "--epochs", "1", "--learning-rate", "3e-3"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    logs, out = Path(run_dirs["logs"]), Path(run_dirs["output"])
    metrics = json.loads((logs / "metrics.json").read_text())
    assert metrics["world_size"] == NPROC
    # Each process trained on its half of the batches: an epoch is ceil(batches / 2) steps, not one a batch.
    assert metrics["steps"] == math.ceil(
        batches_per_epoch(tiny_model_dir, dailydialog_dir, BATCH_SIZE, tmp_path) / NPROC
    )

    # One model folder, written once and atomically (no staging or backup folders left behind).
    assert (out / "model.safetensors").is_file() and (out / "training_config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []
    assert not (out / "checkpoints").exists()

    # One set of logs: no record written twice (once per process).
    records = read_jsonl(logs / "train_log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, metrics["steps"] + 1))  # --logging-steps 1
    assert len([r for r in records if "test_loss" in r]) == 1
    assert done.stdout.count('{"train_loss"') == 1, "exactly one process (the main one) prints the metrics"
    assert json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"train_loss"'))) == metrics

    # The all-reduced, token-weighted eval loss of the run equals a one-process evaluation of the saved model.
    assert (
        cli.main(
            [
                "eval",
                "--model",
                str(out),
                "--data",
                str(dailydialog_dir),
                "--split",
                "validation",
                "--cache-dir",
                str(tmp_path / "eval_cache"),
            ]
        )
        == 0
    )
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["tokens"] == metrics["eval_tokens"]
    assert math.isclose(single["loss"], metrics["eval_loss"], rel_tol=1e-4)
