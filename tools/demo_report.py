#!/usr/bin/env python3
"""Writes DIR/report.md of tools/demo.sh from what the rrhf commands wrote in DIR (standard library only):

  DIR/demo.json            the demo's settings (written by demo.sh)
  DIR/timings.tsv          `stage \\t seconds`
  DIR/eval/report.json     rrhf eval: models[0] = the initial model (with best_of_n), models[1] = the trained one
  DIR/eval/generations.jsonl   the greedy generations of both, with their rewards and NLL under the initial model
  DIR/policy/metrics.jsonl rrhf train's per-step metrics; DIR/policy/loss.png, DIR/eval/eval.png the plots

The gap trained − initial is over the same held-out prompts, so its standard error is that of the per-prompt
differences (paired); the unpaired one, sqrt(se_a² + se_b²), is given beside it. Written atomically.
"""
import argparse
import json
import math
import os


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def short(text, n=160):
    text = " ".join(text.split())
    text = text.replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def fmt(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=4, help="held-out continuations shown before/after")
    a = ap.parse_args()
    out = a.out
    cfg = json.load(open(os.path.join(out, "demo.json")))
    rep = json.load(open(os.path.join(out, "eval", "report.json")))
    gens = read_jsonl(os.path.join(out, "eval", "generations.jsonl"))
    metrics = read_jsonl(os.path.join(out, "policy", "metrics.jsonl"))
    timings = []
    with open(os.path.join(out, "timings.tsv")) as f:
        for line in f:
            name, s = line.rstrip("\n").split("\t")
            timings.append((name, int(s)))

    init, trained = rep["models"][0], rep["models"][1]
    k = cfg["k"]
    by_model = {}
    for g in gens:
        by_model.setdefault(g["model"], {})[g["query"]] = g
    gi, gt = by_model[init["model"]], by_model[trained["model"]]
    queries = [q for q in gi if q in gt]  # held-out prompts in file order
    diffs = [gt[q]["reward"] - gi[q]["reward"] for q in queries
             if gi[q]["reward"] is not None and gt[q]["reward"] is not None]
    gap, gap_se = mean_se(diffs)
    unpaired_se = None
    if init["reward_se"] is not None and trained["reward_se"] is not None:
        unpaired_se = math.sqrt(init["reward_se"] ** 2 + trained["reward_se"] ** 2)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    best = init.get("best_of_n")

    scored = os.path.join(out, "data", "scored.jsonl")
    reasons = [f for r in read_jsonl(scored) for f in r.get("finish_reasons", [])] if os.path.exists(scored) else []
    ended = sum(f == "stop" for f in reasons)
    L = []
    L.append("# rrhf demo: RRHF on held-out movie-review prompts\n")
    L.append(f"- model: {cfg['model']}; reward: VADER compound score of the continuation, in [−1, 1]")
    L.append(f"- prompts: {cfg['prompts']}")
    L.append(f"- training data: {k} top-k (k = 50, temperature 1) samples of at most {cfg['max_new_tokens']} new tokens "
             f"per train prompt from the initial model, scored by VADER; RRHF {cfg['epochs']} epoch(s), "
             f"{cfg['batch_queries']} prompts per step, lr {cfg['lr']}, no warm-up, EOS appended only to the "
             f"{ended} of {len(reasons)} continuations that ended on their own (the others were cut at the token "
             f"budget, `finish_reasons` \"length\": an EOS there would teach the model to stop early), "
             f"device {cfg['device']}")
    L.append(f"- evaluation (`rrhf eval`, [eval/report.md](eval/report.md)): greedy continuation of each held-out "
             f"prompt; perplexity of it under the initial model, given the prompt; best-of-{k} = mean over "
             f"held-out prompts of the best VADER score of {k} samples of the initial model (the paper's "
             f"Best-of-n line; RRHF is a best-of-n learner, Eq. 7)\n")

    L.append("## Held-out results\n")
    L.append(f"| Model | Reward (mean) | ± s.e. | Std. | n | PPL (initial model) | Gen. len. (tokens) | Best-of-{k} |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in (("initial", init), ("trained (RRHF)", trained)):
        L.append(f"| {name} | {fmt(m['reward_mean'])} | {fmt(m['reward_se'])} | {fmt(m['reward_std'])} | {m['n']} | "
                 f"{fmt(m['ppl'], 2)} | {m['gen_len_mean']:.1f} | {fmt(m.get('best_of_n'))} |")
    L.append("")

    # The honest sentence.
    n = len(diffs)
    if gap_se is None or gap_se == 0:
        verdict = "cannot be judged (fewer than 2 prompts, or no spread)"
    elif gap > 2 * gap_se:
        verdict = "is clearly above the initial model's (more than 2 standard errors)"
    elif gap > 0:
        verdict = "is above the initial model's, but by less than 2 standard errors: not clearly"
    else:
        verdict = "is NOT above the initial model's"
    s = (f"**Gap**: the trained model's held-out reward {verdict}: trained − initial = {gap:+.3f} "
         f"(paired s.e. {fmt(gap_se)} over the {n} held-out prompts; unpaired {fmt(unpaired_se)}); it scores higher "
         f"on {wins} prompts and lower on {losses}.")
    if best is not None:
        room = best - init["reward_mean"]
        if room > 0:
            s += (f" The initial model's best-of-{k} is {best:.3f}, so training covers "
                  f"{gap / room:.0%} of the way from the initial model's greedy reward to best-of-{k}")
            s += " (it goes beyond best-of-k)." if gap > room else "."
        else:
            s += f" The initial model's best-of-{k} ({best:.3f}) is not above its greedy reward."
    if init["ppl"] and trained["ppl"]:
        s += (f" Perplexity under the initial model goes from {init['ppl']:.2f} to {trained['ppl']:.2f} "
              f"(×{trained['ppl'] / init['ppl']:.2f}).")
    L.append(s + "\n")
    td = rep.get("train_data")
    if td:
        allrow = next((r for r in td["stats"] if r["group"] == "all"), None)
        if allrow:
            L.append(f"Training samples (Table 6): {allrow['responses']} responses to {allrow['queries']} train "
                     f"prompts, mean reward {allrow['mean']:.3f} (std {allrow['std']:.3f}), mean of the per-prompt "
                     f"best {allrow['max']:.3f} — the paper finds the trained model's reward close to this "
                     f"best-of-n statistic of its training samples.\n")
    if cfg.get("tiny"):
        L.append("_Tiny run (CI): a random fixture model; the numbers only show that the code path works._\n")

    L.append("## Plots\n")
    L.append("- training loss, ranking loss, SFT loss and ranking accuracy per step: "
             "[policy/loss.png](policy/loss.png)\n- held-out reward (± s.e.) and best-of-k, perplexity, per model: "
             "[eval/eval.png](eval/eval.png)\n")
    L.append("![loss](policy/loss.png)\n\n![reward](eval/eval.png)\n")
    if metrics:
        q = max(1, len(metrics) // 4)

        def avg(rows, key):
            xs = [r[key] for r in rows if r.get(key) is not None]
            return sum(xs) / len(xs) if xs else None

        head, tail = metrics[:q], metrics[-q:]
        L.append(f"Training: {len(metrics)} steps; mean over the first / last {q} step(s) (per-step values are noisy "
                 f"with {cfg['batch_queries']} prompts per step): loss {fmt(avg(head, 'loss'))} → "
                 f"{fmt(avg(tail, 'loss'))}, SFT loss {fmt(avg(head, 'sft_loss'))} → {fmt(avg(tail, 'sft_loss'))}, "
                 f"ranking accuracy {fmt(avg(head, 'rank_acc'), 2)} → {fmt(avg(tail, 'rank_acc'), 2)}. The losses "
                 f"are on fresh prompts at every step of the first epoch.\n")

    L.append(f"## Held-out continuations, before / after (the first {a.examples} held-out prompts, not picked)\n")
    L.append("| Prompt | Initial model | VADER | Trained model | VADER |")
    L.append("|---|---|---:|---|---:|")
    for q in queries[: a.examples]:
        L.append(f"| {short(q, 100)} | {short(gi[q]['response'])} | {fmt(gi[q]['reward'], 2)} | "
                 f"{short(gt[q]['response'])} | {fmt(gt[q]['reward'], 2)} |")
    L.append("")

    L.append("## Wall time per stage\n")
    L.append("| Stage | Seconds |")
    L.append("|---|---:|")
    total = 0
    for name, sec in timings:
        label = name.split(":")[0]
        if label == "build":
            continue
        total += sec
        L.append(f"| {label} | {sec} |")
    L.append(f"| **total** (build excluded) | {total} |")
    build = dict(timings).get("build")
    L.append("")
    if cfg.get("prebuilt"):
        b = "The binary was given (RRHF_BIN): no build in this run."
    else:
        b = (f"`cargo build --release`: {build} s in this run (an up-to-date binary takes a second or two; a "
             "cold build of rrhf and its dependencies took 5m47s on the 2-core development machine).")
    L.append(b + " Timings on a shared machine are pessimistic: other sessions' builds and benchmarks ran on the "
             "same cores.\n")

    path = os.path.join(out, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(L))
    os.replace(tmp, path)
    print(open(path, encoding="utf-8").read())


if __name__ == "__main__":
    main()
