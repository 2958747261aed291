#!/usr/bin/env bash
# The GPU figures of issue 18, in one call on a lent GPU (see ../shared/gpu/README.md): run `../shared/gpu/prepare.sh`
# here first, then, through the device tool, with `.gpu` in carry:
#
#     bash bench/measure_gpu.sh            # everything below, ~9 minutes on an H200
#     bash bench/measure_gpu.sh quick      # the sync test and `bench` only, ~5 minutes
#
# Every stage has its own timeout and writes under $OUT (default /tmp/gpu-out); a short table is printed last.
# Model: random-init GPT-2 124M of the real shape with the real tokenizer (pretrained weights are not reachable).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
source .gpu/setup-on-gpu.sh
DATA=${GPT2FT_GPU_DATA:?setup-on-gpu.sh sets it}
MODEL=/tmp/m124
python3 -c "from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel as M; import os, torch; torch.manual_seed(0); \
  t=os.environ['GPT2FT_GPU_TOKENIZER']; M(GPT2Config(n_layer=12, n_head=12, n_embd=768)).save_pretrained('$MODEL'); \
  AutoTokenizer.from_pretrained(t).save_pretrained('$MODEL')" >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"

# 1. No synchronisation in a steady step: pack and pad, fp32, bf16, fp16 (torch.cuda.set_sync_debug_mode("error")).
timeout 240 python3 -m pytest -q -m gpu tests/test_step_overhead.py > "$OUT/gpu_tests.txt" 2>&1
# 2. The benchmark: every variant, 3 interleaved repeats (goal: under 5 minutes).
start=$(date +%s)
timeout 420 python3 -m gpt2ft bench --model "$MODEL" --data "$DATA" --variants all --repeats 3 --cache-dir /tmp/bc > "$OUT/bench_all.jsonl" 2> "$OUT/bench_all.err"
echo "bench_all_wall_s $(( $(date +%s) - start ))" > "$OUT/walls.txt"
if [ "${1:-}" != quick ]; then
  # 3. MFU at --batch-size 128 (bf16).
  timeout 240 python3 -m gpt2ft bench --model "$MODEL" --data "$DATA" --variants gpt2ft_pack_bf16 --batch-size 128 --dialogs 6000 --steps 20 \
    --repeats 3 --cache-dir /tmp/bc > "$OUT/bench_b128.jsonl" 2> "$OUT/bench_b128.err"
  # 4. One epoch at default settings, eager and compiled: train_runtime_s, the whole command, peak allocated memory.
  for mode in eager compile; do
    flag=""; [ "$mode" = compile ] && flag="--compile"
    start=$(date +%s)
    timeout 240 python3 -m gpt2ft train --model "$MODEL" --data "$DATA" --epochs 1 $flag --output-dir "/tmp/run-$mode" \
      --logs-dir "/tmp/logs-$mode" --images-dir "/tmp/img-$mode" --cache-dir /tmp/tc > "$OUT/train_$mode.json" 2> "$OUT/train_$mode.err"
    echo "train_${mode}_wall_s $(( $(date +%s) - start ))" >> "$OUT/walls.txt"
  done
fi
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(name):
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []
walls = dict(line.split() for line in (out / "walls.txt").read_text().splitlines()) if (out / "walls.txt").exists() else {}
print("gpu:", (out / "gpu.txt").read_text().strip())
print("sync test:", ((out / "gpu_tests.txt").read_text().strip().splitlines() or ["(none)"])[-1])
records = {r["variant"]: r for r in lines("bench_all.jsonl") if "variant" in r}
for name, r in records.items():
    print(f"{name:24s} {r.get('real_tokens_per_s')!s:>10} tok/s  [{r.get('real_tokens_per_s_min')}-{r.get('real_tokens_per_s_max')}]"
          f"  step {r.get('step_time_ms')} ms  mfu {r.get('mfu')}  peak {r.get('peak_memory_mb')} MiB")
for r in lines("bench_all.jsonl"):
    if "ratio" in r:
        print(f"ratio {r['ratio']}: {r['value']}")
for r in lines("bench_b128.jsonl"):
    if "variant" in r:
        print(f"batch 128 bf16: {r.get('real_tokens_per_s')} tok/s, mfu {r.get('mfu')}, peak {r.get('peak_memory_mb')} MiB")
if "gpt2ft_pack_fp16" in records and "gpt2ft_pack_bf16" in records:
    print("fp16/bf16 step time:", round(records["gpt2ft_pack_fp16"]["step_time_ms"] / records["gpt2ft_pack_bf16"]["step_time_ms"], 3))
for mode in ("eager", "compile"):
    metrics = lines(f"train_{mode}.json")
    if metrics:
        m = metrics[-1]
        print(f"train {mode}: train_runtime_s {m.get('train_runtime_s'):.1f}, whole command {walls.get(f'train_{mode}_wall_s')} s, "
              f"peak allocated {m.get('peak_gpu_allocated_mb')} MiB, eval_loss {m.get('eval_loss'):.4f}, steps {m.get('steps')}")
print("bench --variants all wall:", walls.get("bench_all_wall_s"), "s")
EOF
