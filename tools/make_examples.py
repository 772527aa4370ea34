"""Writes examples/tiny/{train,eval}.jsonl: a small synthetic RRHF set (k = 4 graded responses per query).

The worst response shares most of its tokens with the best one, so supervised fine-tuning on the best response alone
raises it too and misorders it, while the ranking loss learns the order: the paper's rank-loss ablation in miniature.
Deterministic; run with any python3.
"""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "examples", "tiny")
TOPICS = ["the weather", "a recipe", "my garden", "the train", "a good book", "the city", "music", "the sea",
          "a new job", "the market", "old friends", "the mountains", "a short trip", "the library", "dinner"]


def record(rng):
    topic = rng.choice(TOPICS)
    n = rng.randint(1, 99)
    query = f"\n\nHuman: Tell me about {topic}, question {n}.\n\nAssistant:"
    responses = [" Sure, here is a helpful answer.",          # best
                 " Maybe later.",
                 " I do not know.",
                 " Sure, here is a helpful answer. No."]       # worst: the best plus a bad ending
    scores = [3.0, 2.0, 1.0, 0.0]
    order = list(range(4))
    rng.shuffle(order)
    return {"query": query, "responses": [responses[i] for i in order], "scores": [scores[i] for i in order]}


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(7)
    for name, n in [("train", 64), ("eval", 16)]:
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps(record(rng)) + "\n")


if __name__ == "__main__":
    main()
