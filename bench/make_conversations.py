"""Write synthetic chat conversations in the `messages` JSONL layout, for the large-corpus benchmark of `prepare`.

    python bench/make_conversations.py /tmp/million.jsonl --count 1000000 --seed 0
    python -m gpt2ft prepare --data /tmp/million.jsonl --model /tmp/models/tiny --cache-dir /tmp/million-cache

Each conversation has 4 to 12 turns, alternating user and assistant (one in ten starts with a system message), each
turn 6 to 24 words drawn from a fixed vocabulary: text the GPT-2 tokenizer splits like English (~1.3 tokens a
word). The same seed writes the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import time

WORDS = (
    "the a to and of I you it is that in we for this have be on with not are do what can will my your so at "
    "about there was how all just like know think would time good well yes no here now then want need go get "
    "make see look going really people today tomorrow morning evening week weekend work home school office "
    "friend family coffee tea lunch dinner train bus ticket price money bank shop store market weather rain sun "
    "movie music book game phone email meeting project report question answer idea plan problem help thanks "
    "sorry please great nice sure maybe actually probably usually sometimes always never again later soon"
).split()
SYSTEM = ["You are a helpful assistant.", "Answer briefly and politely.", "You are a travel agent."]
PUNCTUATION = (".", ".", ".", "?", "!")


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(6, 24))
    return " ".join(words).capitalize() + rng.choice(PUNCTUATION)


def conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.1 else []
    for turn in range(rng.randint(4, 12)):
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": sentence(rng)})
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with open(args.path, "w", encoding="utf-8") as out:
        for _ in range(args.count):
            out.write(json.dumps({"messages": conversation(rng)}) + "\n")
    print(
        json.dumps({"path": args.path, "conversations": args.count, "seconds": round(time.perf_counter() - started, 1)})
    )


if __name__ == "__main__":
    main()
