"""A real pretrained model end to end: what fine-tuning gains, and gpt2ft beside TRL's SFTTrainer. The numbers in
bench/RESULTS.md, section "A real model".

    ../shared/models/get-smollm2.sh /tmp/smollm2          # SmolLM2-135M-Instruct as /tmp/smollm2/hf
    python bench/real_model.py --model /tmp/smollm2/hf --data ../shared/data/dailydialog \
        --train-dialogs 300 --eval-dialogs 100 --learning-rates 2e-5,5e-5,1e-4 --out /tmp/real_model.json

On the same training dialogues (the first --train-dialogs of the leakage-free train split), the same held-out
dialogues and the same evaluator (gpt2ft's token-weighted loss, perplexity and bits per byte over the held-out
dialogues' every turn, in the model's own chat template), it measures:

- the model as it comes (zero-shot), and after one epoch of `gpt2ft train` at each learning rate;
- TRL's SFTTrainer with its documented defaults (SFTConfig(): learning rate 2e-5, batch 8, no packing, loss on
  every token, gradient checkpointing) on the same conversations for the same epoch: the kit a user would pick
  instead;
- for each: training tokens per second (non-padding input tokens a second of training), the held-out figures, and
  replies sampled with the saved decoding settings (share that end at the end-of-turn token, a few samples).

One JSON line a result goes to stdout, and all of them to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2ft.chat_format import as_messages
from gpt2ft.config import TrainConfig
from gpt2ft.data import prepare_dialogs, tokenize_prepared
from gpt2ft.evaluation import evaluate_dialogs, reply_metrics, sample_replies
from gpt2ft.generate import build_generation_config
from gpt2ft.modeling import load_model_and_tokenizer
from gpt2ft.training import train


def held_out_scores(model, tokenizer, prepared, loss_on: str) -> dict:
    """gpt2ft's evaluator on validation and test, as every result here is scored."""
    scores = {}
    for prefix, split in (("eval", "validation"), ("test", "test")):
        result = evaluate_dialogs(model, tokenizer, prepared.dialogs[split], loss_on=loss_on, batch_size=16)
        scores.update({f"{prefix}_{key}": result[key] for key in ("loss", "perplexity", "bits_per_byte")})
    return scores


def replies(model, tokenizer, prepared, count: int) -> dict:
    model.generation_config = build_generation_config(tokenizer)  # the saved decoding settings, for every model
    records = sample_replies(model, tokenizer, prepared.dialogs["test"], count, seed=0)
    return {**reply_metrics(records), "examples": [(r["context"][-1], r["reply"]) for r in records[:3]]}


def run_gpt2ft(args, learning_rate: float, root: Path) -> dict:
    folder = root / f"gpt2ft-{learning_rate:g}"
    config = TrainConfig(
        model=args.model,
        data=args.data,
        output_dir=str(folder / "model"),
        logs_dir=str(folder / "logs"),
        images_dir=str(folder / "images"),
        cache_dir=args.cache_dir,
        max_train_dialogs=args.train_dialogs,
        max_eval_dialogs=args.eval_dialogs,
        epochs=args.epochs,
        learning_rate=learning_rate,
        batch_size=args.batch_size,
    )
    result = train(config)
    metrics = result.metrics
    model, tokenizer = result.published.model, result.published.tokenizer
    # The training rows (cached by the run): their tokens are what a step feeds the model, padding aside.
    rows = tokenize_prepared(result.data, tokenizer, metrics["max_length"], args.cache_dir)
    input_tokens = int(sum(rows["train"]["length"][:]) * args.epochs)
    return {
        "recipe": f"gpt2ft train --learning-rate {learning_rate:g}",
        "train_seconds": metrics["train_runtime_s"],
        "input_tokens": input_tokens,
        "input_tokens_per_s": input_tokens / metrics["train_runtime_s"],
        "target_tokens_per_s": metrics["train_tokens_per_s"],
        "steps": metrics["steps"],
        "eval_loss_by_epoch": [
            round(record["eval_loss"], 4)
            for record in map(json.loads, (folder / "logs" / "train_log.jsonl").read_text().splitlines())
            if "eval_loss" in record
        ],
        **{key: metrics[key] for key in metrics if key.startswith(("eval_", "test_", "base_")) and "tokens" not in key},
        **{f"replies_{key}": value for key, value in replies(model, tokenizer, result.data, args.samples).items()},
    }


def run_trl(args, prepared, root: Path) -> dict:
    """TRL's SFTTrainer with SFTConfig's defaults on the same conversations, as messages in the model's template."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model_and_tokenizer(args.model)
    conversations = [{"messages": as_messages(m)} for m in prepared.dialogs["train"]["messages"]]
    cuda = torch.cuda.is_available()
    settings = SFTConfig(
        output_dir=str(root / "trl"),
        num_train_epochs=args.epochs,  # the same budget: one pass over the same conversations
        report_to=[],
        save_strategy="no",
        use_cpu=not cuda,  # the defaults otherwise ask for bf16 on a GPU; on this CPU, fp32
        bf16=cuda and torch.cuda.is_bf16_supported(),
        logging_steps=10**6,
        include_num_input_tokens_seen="non_padding",  # a count for the comparison, not a training setting
    )
    trainer = SFTTrainer(
        model=model, args=settings, train_dataset=Dataset.from_list(conversations), processing_class=tokenizer
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen or 0) or int(getattr(trainer, "_total_train_tokens", 0) or 0)
    if not tokens:
        tokens = sum(
            sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"])
            for row in trainer.train_dataset
        )
    model = trainer.model.eval()
    return {
        "recipe": "TRL SFTTrainer, SFTConfig defaults (lr 2e-5, batch 8, no packing, loss on all tokens)",
        "train_seconds": round(seconds, 1),
        "input_tokens": tokens,
        "input_tokens_per_s": tokens / seconds,
        "train_loss_trl": output.training_loss,
        "steps": trainer.state.global_step,
        **held_out_scores(model, tokenizer, prepared, prepared.loss_on),
        **{f"replies_{key}": value for key, value in replies(model, tokenizer, prepared, args.samples).items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="hub")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--train-dialogs", type=int, default=300)
    parser.add_argument("--eval-dialogs", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--learning-rates", default="5e-5")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    prepared = prepare_dialogs(
        args.data, args.cache_dir, max_train_dialogs=args.train_dialogs, max_eval_dialogs=args.eval_dialogs
    )
    results = []

    def report(record: dict) -> None:
        results.append(record)
        print(json.dumps(record, default=str), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    report(
        {
            "recipe": "zero-shot (the model as it comes)",
            "train_dialogs": len(prepared.dialogs["train"]),
            "eval_dialogs": len(prepared.dialogs["validation"]),
            "test_dialogs": len(prepared.dialogs["test"]),
            **held_out_scores(model, tokenizer, prepared, prepared.loss_on),
            **{f"replies_{key}": value for key, value in replies(model, tokenizer, prepared, args.samples).items()},
        }
    )
    del model
    with tempfile.TemporaryDirectory(prefix="gpt2ft-real-") as root:
        for rate in (float(value) for value in args.learning_rates.split(",")):
            report(run_gpt2ft(args, rate, Path(root)))
        if not args.skip_trl:
            report(run_trl(args, prepared, Path(root)))
    print(f"{len(results)} results" + (f" written to {args.out}" if args.out else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
