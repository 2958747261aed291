"""Peak memory of one training step of GPT-2 small (random init, real shape) at the default batch shape, with the
model's own loss (full logits) or gpt2ft's chunked loss (gpt2ft/loss.py). Each measurement runs in a fresh process.

    python bench/measure_loss_memory.py                 # CPU: peak RSS growth of the step, in MB
    python bench/measure_loss_memory.py --device cuda   # GPU: torch.cuda.max_memory_allocated, in MiB

Prints one JSON line per loss path, then the saving.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEP = r"""
import json, resource, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from gpt2ft.loss import use_chunked_loss
path, device, rows, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config()).to(device).train()
model.config.use_cache = False
if path == "chunked":
    use_chunked_loss(model)
ids = torch.randint(0, 50257, (rows, width), device=device)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with autocast:
    loss = model(input_ids=ids, labels=ids).loss
loss.backward()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before; unit = 2**20
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before; unit = 10**6
print(json.dumps({"loss_path": path, "device": device, "batch": [rows, width],
                  "step_peak_mb": round(peak / unit, 1), "loss": round(float(loss), 4)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    results = {}
    for path in ("plain", "chunked"):
        out = subprocess.run(
            [sys.executable, "-c", STEP, path, args.device, str(args.rows), str(args.width)],
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(out.stdout.strip().splitlines()[-1])
        results[path] = record
        print(json.dumps(record))
    print(json.dumps({"saved_mb": round(results["plain"]["step_peak_mb"] - results["chunked"]["step_peak_mb"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
