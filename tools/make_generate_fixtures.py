#!/usr/bin/env python3
"""Generation fixtures for rrhf's generator: transformers `generate` token ids on the tiny fixture models.

Writes tests/fixtures/generate/generate.json (format: tests/fixtures/generate/README.md). Deterministic.

  tools/.venv/bin/python tools/make_generate_fixtures.py [--old-python /tmp/venv-tf445/bin/python]

Greedy and beam search come from the transformers in tools/.venv (4.57.6). Group (diverse) beam search left the
library in transformers >= 4.56 (it is fetched from the hub as "transformers-community/group-beam-search", which
needs the network), so those cases are produced by a second interpreter with transformers 4.45.2, which has it
built in; that interpreter runs this same script with --diverse-only and prints its cases as JSON. Make it with

  python3 -m venv /tmp/venv-tf445 && /tmp/venv-tf445/bin/pip install --no-deps transformers==4.45.2 'tokenizers<0.21'
  echo "$PWD/tools/.venv/lib/python3.11/site-packages" > /tmp/venv-tf445/lib/python3.11/site-packages/zz_torch.pth

(the .pth line lends it tools/.venv's torch 2.8, numpy, safetensors and huggingface_hub; its own transformers and
tokenizers come first on sys.path).

Near-ties: random tiny models produce float32 near-ties, where candle and torch may legitimately pick different
tokens. Every case records margins so the Rust test can skip them:
  greedy: `margins[p][s]` = top-1 minus top-2 logit of prompt p at step s;
  beam / diverse beam: `margins[p][s]` = smallest gap between consecutive candidate scores among the best
  2·(beams per group)+1 candidates of any group of prompt p at step s (the order of these decides which beams
  survive and which hypotheses finish). Scores are reconstructed from the log-probabilities a recording logits
  processor sees (after the diversity penalty), summed along each beam's history.
"""

import argparse
import json
import os
import subprocess
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "generate", "generate.json")

MODELS = ["llama", "gpt2", "gpt_neox"]
PAD = 3
MAX_NEW = 12
# Prompt lengths: different, so the batch is left padded.
PROMPT_LENS = [6, 3, 9]

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

BEAM_CASES = [
    # name, num_beams, num_return_sequences, length_penalty, early_stopping
    ("beam4_lp0.7_es_true", 4, 2, 0.7, True),
    ("beam4_lp1.0_es_false", 4, 2, 1.0, False),
    ("beam4_lp2.0_es_false", 4, 2, 2.0, False),
    ("beam4_lp1.0_es_never", 4, 2, 1.0, "never"),
    ("beam4_lp2.0_es_true", 4, 4, 2.0, True),
]
DIVERSE_CASES = [
    # name, num_beams, num_beam_groups, diversity_penalty, num_return_sequences, length_penalty, early_stopping
    ("diverse4x2_lp1.0_es_false", 4, 2, 1.0, 2, 1.0, False),
    ("diverse4x4_lp1.0_es_false", 4, 4, 1.0, 2, 1.0, False),
    ("diverse4x2_lp0.7_es_true", 4, 2, 1.0, 4, 0.7, True),
    ("diverse4x4_lp2.0_es_never", 4, 4, 1.0, 4, 2.0, "never"),
]


def load(name):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "models", name), attn_implementation="eager")
    m.eval()
    return m


def prompts_for(name):
    g = torch.Generator().manual_seed({"llama": 11, "gpt2": 12, "gpt_neox": 13}[name])
    return [torch.randint(4, 320, (n,), generator=g).tolist() for n in PROMPT_LENS]


def left_pad(prompts):
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids, mask


class Recorder(LogitsProcessor):
    """Keeps (input_ids, scores) of every call: once per step (beam search) or once per group and step."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


def beam_margins(calls, n_prompts, num_beams, groups, prompt_len):
    """Per prompt and step: the smallest gap among the best 2·gs+1 candidate scores of any group."""
    gs = num_beams // groups
    cum = {}  # (group, sequence) -> accumulated score
    steps = len(calls) // groups
    out = [[float("inf")] * steps for _ in range(n_prompts)]
    for s in range(steps):
        for g in range(groups):
            ids, scores = calls[s * groups + g]
            scores = scores.double()
            for p in range(n_prompts):
                rows = list(range(p * gs, (p + 1) * gs))
                seqs = [tuple(ids[r].tolist()) for r in rows]
                if s > 0 and all(x == seqs[0] for x in seqs):
                    continue  # a finished group of the old scorer: its beams are copies padded with pad ids
                cands = []
                for j, r in enumerate(rows):
                    if s == 0:
                        if j > 0:
                            continue  # only the first beam of a group is live at the first step
                        base = 0.0
                    else:
                        base = cum.get((g, seqs[j]))
                        if base is None:
                            continue
                    cands.append(scores[r] + base)
                allc = torch.cat(cands)
                k = min(2 * gs + 1, allc.numel())
                top, idx = torch.topk(allc, k)
                gaps = (top[:-1] - top[1:]).tolist()
                out[p][s] = min(out[p][s], min(gaps))
                # remember the accumulated score of every kept candidate's sequence
                v = scores.shape[1]
                live = [j for j in range(gs) if s > 0 or j == 0]
                live = [j for j in live if s == 0 or (g, seqs[j]) in cum]
                for val, flat in zip(top.tolist(), idx.tolist()):
                    j = live[flat // v]
                    cum[(g, seqs[j] + (flat % v,))] = val
    return out


def greedy_case(model, prompts, eos):
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW,
                         eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
    t = ids.shape[1]
    outputs, margins = [], []
    for i in range(len(prompts)):
        new = out.sequences[i, t:].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos) + 1]
        outputs.append([{"ids": new}])
        ms = []
        for s in range(len(new)):
            top2 = torch.topk(out.logits[s][i].double(), 2).values
            ms.append(float(top2[0] - top2[1]))
        margins.append(ms)
    return {"strategy": "greedy", "outputs": outputs, "margins": margins}


def beam_case(model, prompts, eos, num_beams, nrs, lp, es, groups=1, dp=0.0):
    ids, mask = left_pad(prompts)
    rec = Recorder()
    kw = dict(num_beam_groups=groups, diversity_penalty=dp) if groups > 1 else {}
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                         num_return_sequences=nrs, length_penalty=lp, early_stopping=es, max_new_tokens=MAX_NEW,
                         eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
                         logits_processor=LogitsProcessorList([rec]), **kw)
    t = ids.shape[1]
    outputs = []
    for i in range(len(prompts)):
        row = []
        for j in range(nrs):
            k = i * nrs + j
            new = out.sequences[k, t:].tolist()
            if groups == 1:
                new = new[:int((out.beam_indices[k] >= 0).sum())]
            elif eos in new:
                # 4.x group beam search returns wrong beam_indices (it indexes the groups' histories with
                # group-local beam numbers), so its lengths come from the tokens: a hypothesis either ends at
                # its first EOS (the row is padded after it) or runs to the longest length.
                new = new[:new.index(eos) + 1]
            row.append({"ids": new, "score": float(out.sequences_scores[k])})
        outputs.append(row)
    margins = beam_margins(rec.calls, len(prompts), num_beams, groups, t)
    return {"outputs": outputs, "margins": margins}


def pick_eos(model, prompts):
    """A token that the greedy runs rank among the top 4 at later steps but never first at step 0 or 1: beams
    finish now and then, not immediately."""
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
    counts = torch.zeros(out.logits[0].shape[-1])
    banned = set()
    for s, lg in enumerate(out.logits):
        for i in range(len(prompts)):
            top = torch.topk(lg[i], 4).indices.tolist()
            if s <= 1:
                banned.add(top[0])
            elif s >= 3:
                for tok in top[1:]:
                    counts[tok] += 1
    for tok in banned | {0, 1, 2, 3}:
        counts[tok] = -1
    return int(torch.argmax(counts))


def diverse_cases(models_eos):
    res = {}
    for name, (prompts, eos) in models_eos.items():
        model = load(name)
        model.generation_config.eos_token_id = eos
        cases = []
        for cname, nb, groups, dp, nrs, lp, es in DIVERSE_CASES:
            with torch.no_grad():
                c = beam_case(model, prompts, eos, nb, nrs, lp, es, groups=groups, dp=dp)
            c.update(name=cname, strategy="diverse_beam", num_beams=nb, num_beam_groups=groups,
                     diversity_penalty=dp, num_return_sequences=nrs, length_penalty=lp, early_stopping=es,
                     transformers=transformers.__version__)
            cases.append(c)
        res[name] = cases
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-python", default="/tmp/venv-tf445/bin/python",
                    help="an interpreter with transformers 4.x that has group beam search built in")
    ap.add_argument("--diverse-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.diverse_only:
        spec = json.loads(sys.stdin.read())
        json.dump(diverse_cases({k: (v["prompts"], v["eos"]) for k, v in spec.items()}), sys.stdout)
        return

    doc = {"transformers": transformers.__version__, "torch": torch.__version__, "pad_id": PAD,
           "max_new_tokens": MAX_NEW, "models": {}}
    spec = {}
    for name in MODELS:
        model = load(name)
        prompts = prompts_for(name)
        with torch.no_grad():
            eos = pick_eos(model, prompts)
        model.generation_config.eos_token_id = eos
        cases = []
        with torch.no_grad():
            c = greedy_case(model, prompts, eos)
            c.update(name="greedy", transformers=transformers.__version__)
            cases.append(c)
            c = greedy_case(model, prompts, None)
            c.update(name="greedy_no_eos", transformers=transformers.__version__, no_eos=True)
            cases.append(c)
            for cname, nb, nrs, lp, es in BEAM_CASES:
                c = beam_case(model, prompts, eos, nb, nrs, lp, es)
                c.update(name=cname, strategy="beam", num_beams=nb, num_return_sequences=nrs, length_penalty=lp,
                         early_stopping=es, transformers=transformers.__version__)
                cases.append(c)
        doc["models"][name] = {"prompts": prompts, "eos": eos, "cases": cases}
        spec[name] = {"prompts": prompts, "eos": eos}

    r = subprocess.run([a.old_python, os.path.abspath(__file__), "--diverse-only"], input=json.dumps(spec),
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"the diverse-beam interpreter {a.old_python} failed:\n{r.stderr}")
    diverse = json.loads(r.stdout)
    for name, cases in diverse.items():
        doc["models"][name]["cases"].extend(cases)
    versions = sorted({c["transformers"] for m in doc["models"].values() for c in m["cases"]})
    doc["transformers_versions"] = versions

    # Steps where nothing was compared (a finished group) have an infinite margin: written as null.
    for m in doc["models"].values():
        for c in m["cases"]:
            c["margins"] = [[x if x != float("inf") else None for x in ms] for ms in c["margins"]]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    # A summary: lengths of the outputs and how many prompts have a near-tie.
    for name, m in doc["models"].items():
        print(f"{name}: eos {m['eos']}, prompts {[len(p) for p in m['prompts']]}")
        for c in m["cases"]:
            lens = [[len(o["ids"]) for o in row] for row in c["outputs"]]
            ties = sum(1 for ms in c["margins"] if any(x is not None and x < 1e-4 for x in ms))
            print(f"  {c['name']:<28} {c['transformers']:<7} lengths {lens} prompts with a near-tie: {ties}")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
