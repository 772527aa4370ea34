#!/usr/bin/env python3
"""Build the demo's IMDB-like prompts (the RRHF paper's Appendix C) from VADER's human-rated movie-review snippets.

Input: movieReviewSnippets_GroundTruth.txt of vaderSentiment 3.3.2's sdist (`id \\t rating \\t text`, 10,604 lines).
A prompt is the first half of the words of a snippet (the paper: a partial review, continued by the model). Snippets
with fewer than --min-words words are skipped, and duplicate prompts are dropped (first occurrence kept), so the
splits are disjoint as text. A fixed seeded shuffle (Python's random.Random(seed)) puts the first --eval snippets in
the held-out eval split, the next --dev in a dev split (for tuning; never the eval split), the next --train in the
train split. Writes JSONL `{"query"}` lines, atomically (temporary file + rename). Standard library only.
"""
import argparse
import json
import os
import random
import sys


def prompts(path, min_words):
    seen = set()
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                sys.exit(f"{path}:{lineno}: expected `id \\t rating \\t text`")
            words = parts[2].split()
            if len(words) < min_words:
                continue
            query = " ".join(words[: len(words) // 2])
            if query in seen:
                continue
            seen.add(query)
            out.append(query)
    return out


def write(path, queries):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({"query": q}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snippets", required=True)
    ap.add_argument("--train", type=int, required=True, help="train prompts")
    ap.add_argument("--eval", type=int, required=True, help="held-out eval prompts")
    ap.add_argument("--dev", type=int, default=0, help="dev prompts (tuning), disjoint from both")
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument("--min-words", type=int, default=12)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    qs = prompts(a.snippets, a.min_words)
    need = a.eval + a.dev + a.train
    if need > len(qs):
        sys.exit(f"{a.snippets}: {len(qs)} usable snippets (>= {a.min_words} words), {need} asked for")
    random.Random(a.seed).shuffle(qs)
    ev, dev, tr = qs[: a.eval], qs[a.eval : a.eval + a.dev], qs[a.eval + a.dev : need]
    assert not (set(ev) & set(tr)) and not (set(ev) & set(dev)) and not (set(dev) & set(tr))
    write(os.path.join(a.out_dir, "eval_prompts.jsonl"), ev)
    write(os.path.join(a.out_dir, "train_prompts.jsonl"), tr)
    if a.dev:
        write(os.path.join(a.out_dir, "dev_prompts.jsonl"), dev)
    print(f"prompts: {len(tr)} train, {len(ev)} held-out eval" + (f", {len(dev)} dev" if a.dev else "")
          + f" (seed {a.seed}; {len(qs)} usable snippets of >= {a.min_words} words) in {a.out_dir}")


if __name__ == "__main__":
    main()
