#!/usr/bin/env python3
"""Reference perplexities for `rrhf eval --ppl-model` (tests/it/eval.rs), from transformers.

For the tiny fixture models tests/fixtures/models/{llama,gpt2} (shared byte-level tokenizer with BOS `<s>`) and a few
fixed (query, response) pairs, computes what rrhf eval's perplexity is defined as (src/eval/perplexity.rs):

  response ids = tokenizer.encode(response, add_special_tokens=False)       (no EOS)
  context ids  = tokenizer.encode(query, add_special_tokens=True)           context "query"
               = [bos_token_id]                                              context "none"
               = []                                                          context "none_nobos" (a tokenizer
                                                                             without BOS: the first response token
                                                                             is predicted from nothing, so unscored)
  nll          = mean over the scored response tokens of -log p(token | everything before it), one forward of
                 context + response (float32, eager attention, no padding)
  perplexity   = exp(nll); mean_perplexity = the mean over pairs with at least one scored token (the
                 `mean_perplexity` of Hugging Face's perplexity metric), the others counted as `excluded`

A model with learned positions (GPT-2, n_positions 64) sees at most 64 tokens: the context is cut on the left
keeping its BOS so that the response fits (at least one context token kept), then the response is cut on the right
(`truncated: true`). Two pairs need that for gpt2: one
loses its whole context but BOS and part of its response, one only the start of its context.

Writes tests/fixtures/eval/perplexity.json:
  {"transformers", "torch", "cases": [{"model", "context", "pairs": [{"query", "response", "ctx_ids",
   "resp_ids", "truncated", "nll" (null if no token scored), "n_tokens", "ppl"}], "mean_perplexity", "excluded"}]}

Run: tools/.venv/bin/python tools/make_eval_fixtures.py   (packages: tools/requirements-fixtures.txt)
Deterministic (CPU, one thread).
"""

import json
import math
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "eval")

PAIRS = [
    ("\n\nHuman: What is a good name for a cat?\n\nAssistant:", " Whiskers is a classic name for a cat."),
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Bring water to a boil, add the egg and cook it."),
    ("Translate to French: cheese", " fromage"),
    ("One token:", "!"),
    ("An empty response has no perplexity.", ""),
    (
        "\n\nHuman: Tell me a long story about the sea, the wind and a small boat that sailed too far.\n\nAssistant:",
        " Once upon a time a small boat left the harbour at dawn. The wind was kind, the sea was calm, and the boat "
        "sailed on and on until the coast was gone.",
    ),
    (
        "\n\nHuman: Tell me a long story about the sea, the wind and a small boat that sailed too far.\n\nAssistant:",
        " It was a calm day.",
    ),
]


def fit(ctx, resp, limit, bos):
    """The cut of src/eval/perplexity.rs::tokenize_pair for a model with `limit` positions."""
    if limit is None or len(ctx) + len(resp) <= limit:
        return ctx, resp, False
    keep = max(limit - len(resp), min(len(ctx), 1))
    if ctx and len(ctx) > keep:
        if bos is not None and ctx[0] == bos:
            ctx = [ctx[0]] + (ctx[len(ctx) - (keep - 1):] if keep > 1 else [])
        else:
            ctx = ctx[len(ctx) - keep:]
    resp = resp[: limit - len(ctx)]
    return ctx, resp, True


def nll_of(model, ctx, resp):
    ids = ctx + resp
    first = max(len(ctx), 1)
    if len(ids) <= first:
        return None, 0
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(first, len(ids)):
        total -= logp[t - 1, ids[t]].item()
    n = len(ids) - first
    return total / n, n


def main():
    torch.set_num_threads(1)
    cases = []
    for name in ["llama", "gpt2"]:
        path = os.path.join(FIX, "models", name)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        limit = getattr(model.config, "n_positions", None)
        for context in ["query", "none", "none_nobos"]:
            rows = []
            for query, response in PAIRS:
                resp = tok.encode(response, add_special_tokens=False)
                if context == "query":
                    ctx = tok.encode(query, add_special_tokens=True)
                elif context == "none":
                    ctx = [tok.bos_token_id]
                else:
                    ctx = []
                bos = tok.bos_token_id if context != "none_nobos" else None
                ctx, resp, truncated = fit(ctx, resp, limit, bos)
                nll, n = nll_of(model, ctx, resp)
                rows.append(
                    {
                        "query": query,
                        "response": response,
                        "ctx_ids": ctx,
                        "resp_ids": resp,
                        "truncated": truncated,
                        "nll": nll,
                        "n_tokens": n,
                        "ppl": None if nll is None else math.exp(nll),
                    }
                )
            ppls = [r["ppl"] for r in rows if r["ppl"] is not None]
            cases.append(
                {
                    "model": name,
                    "context": context,
                    "pairs": rows,
                    "mean_perplexity": sum(ppls) / len(ppls),
                    "excluded": len(rows) - len(ppls),
                }
            )
    os.makedirs(OUT, exist_ok=True)
    doc = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases}
    with open(os.path.join(OUT, "perplexity.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for c in cases:
        print(f"{c['model']:6} {c['context']:11} mean_perplexity {c['mean_perplexity']:.4f} excluded {c['excluded']}")


if __name__ == "__main__":
    main()
