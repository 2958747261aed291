"""Measure reply statistics under three repetition guards: transformers' prompt-wide no_repeat_ngram_size, none, and
gpt2ft's reply-only guard (generate.ReplyNoRepeatNGram). The numbers in bench/RESULTS.md, section 3.

    python bench/measure_decoding.py --model MODEL_DIR --data ../shared/data/dailydialog --samples 300 [--greedy]

Every guard answers the same held-out contexts (evaluation.sample_replies: the first half of each validation
dialogue) with the model's saved decoding settings and seed 0. `blocked` counts the replies in which the
prompt-wide guard banned EOS while it was the model's top choice: replies it kept from ending.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from gpt2ft.data import prepare_dialogs
from gpt2ft.evaluation import reply_metrics, sample_replies
from gpt2ft.generate import REPLY_NO_REPEAT_NGRAM, load_for_generation


class WatchedPromptWideGuard(LogitsProcessor):
    """transformers' NoRepeatNGramLogitsProcessor, noting each time it bans EOS that the model wanted most."""

    def __init__(self, size: int, eos: int, blocked: set[int], reply: int) -> None:
        self.inner, self.eos, self.blocked, self.reply = NoRepeatNGramLogitsProcessor(size), eos, blocked, reply

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        wanted_to_end = int(scores[0].argmax()) == self.eos
        scores = self.inner(input_ids, scores)
        if wanted_to_end and scores[0, self.eos] == -float("inf"):
            self.blocked.add(self.reply)
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="hub")
    parser.add_argument("--cache-dir", default="data")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--greedy", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_for_generation(args.model)
    dialogs = prepare_dialogs(args.data, args.cache_dir).dialogs["validation"]
    generate = model.generate
    for guard in ("prompt-wide", "none", "reply-only"):
        blocked: set[int] = set()
        calls = {"reply": 0}

        def with_guard(*positional, guard=guard, blocked=blocked, calls=calls, **kwargs):
            calls["reply"] += 1
            if guard != "reply-only":  # generate_reply passes its reply-only guard; the others replace it
                watch = WatchedPromptWideGuard(REPLY_NO_REPEAT_NGRAM, tokenizer.eos_token_id, blocked, calls["reply"])
                kwargs["logits_processor"] = LogitsProcessorList([watch]) if guard == "prompt-wide" else None
            return generate(*positional, **kwargs)

        model.generate = with_guard
        records = sample_replies(model, tokenizer, dialogs, args.samples, greedy=args.greedy, seed=0)
        print(
            json.dumps({"guard": guard, "greedy": args.greedy, **reply_metrics(records), "blocked": len(blocked)}),
            flush=True,
        )


if __name__ == "__main__":
    main()
