#!/usr/bin/env python3
"""Reference fixtures for the RRHF loss (Yuan et al. 2023, §3.1; docs: /work/shared/design.md
"The loss, exactly" and "Shared contracts").

An independent, deliberately plain PyTorch implementation: every response is its own row
(query + response, right-padded with <pad>), no packing.  Uses the existing tiny model
tests/fixtures/models/llama (not modified) and writes

  tests/fixtures/loss/cases.json              expected ids, log-probs, p, losses, dL/dp per case
  tests/fixtures/loss/grads_batch2.safetensors float32 d loss / d param for case `batch2` + `loss`

Run:  tools/.venv/bin/python tools/make_loss_fixtures.py   (deterministic, CPU, float32 model)
"""

import json
import os

import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL_DIR = os.path.join(FIX, "models", "llama")
OUT = os.path.join(FIX, "loss")

BOS, EOS, PAD = 1, 2, 3
GRAD_PARAMS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
]

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

H = "\n\nHuman: "
A = "\n\nAssistant:"


def params(max_len=192, max_query_len=None, length_penalty=1.0, margin=0.0, rank_weight=1.0,
           sft_reduction="mean"):
    if max_query_len is None:
        max_query_len = max(max_len - 64, max_len // 2)
    return dict(max_len=max_len, max_query_len=max_query_len, length_penalty=length_penalty,
                margin=margin, rank_weight=rank_weight, sft_reduction=sft_reduction)


CASES = [
    ("graded", params(), [dict(
        query=H + "What is the capital of France?" + A,
        responses=[" I do not know.",
                   " The capital of France is Paris.",
                   " France is a country and the cat sat on the mat.",
                   " Paris."],
        scores=[0.1, 2.0, -1.0, 1.5])]),
    ("ties", params(), [dict(
        query=H + "How do I boil an egg?" + A,
        responses=[" Put the egg in water.",
                   " Put the egg in boiling water for about eight minutes.",
                   " Boil water, then cook the egg for eight minutes.",
                   " I like green tea."],
        scores=[1.0, 2.0, 2.0, 0.0])]),
    ("k1", params(), [dict(
        query=H + "Who wrote Hamlet?" + A,
        responses=[" Hamlet was written by William Shakespeare."],
        scores=[0.3])]),
    ("truncation", params(max_len=24, max_query_len=12), [dict(
        query=H + "Tell me a story about a dog." + A,
        responses=[" The dog ran across the park in the morning and then it slept.",
                   "",
                   " The dog is in the park."],  # 11 tokens + EOS: fits the budget exactly
        scores=[1.0, 0.0, -0.5])]),
    ("batch2", params(), [
        dict(query=H + "What is two plus two?" + A,
             responses=[" Two plus two is five.", " Two plus two is four.", " Four."],
             scores=[0.0, 1.0, 0.5]),
        dict(query=H + "Give me a word that rhymes with cat. Please keep it short." + A,
             responses=[" Hat rhymes with cat.", " The weather is nice today, so let's go outside."],
             scores=[3.0, -3.0]),
    ]),
    ("options", params(length_penalty=2.0, margin=0.1, rank_weight=0.5, sft_reduction="sum"), [dict(
        query=H + "Translate hello into French." + A,
        responses=[" Hello.", " Hello in French is bonjour, I think.", " Bonjour."],
        scores=[0.0, 1.0, 2.0])]),
]

# ---------------------------------------------------------------------------
# Tokenisation (the contract)
# ---------------------------------------------------------------------------


def tokenize(tok, rec, prm):
    """-> (query_ids, [response_ids], query_was_truncated)"""
    q = tok.encode(rec["query"], add_special_tokens=True).ids
    assert q[0] == BOS, q
    mql = prm["max_query_len"]
    truncated = len(q) > mql
    if truncated:
        keep = mql - 1  # tokens kept after the BOS, taken from the end
        q = [BOS] + q[len(q) - keep:]
    budget = prm["max_len"] - len(q)
    assert budget >= 1
    rs = []
    for r in rec["responses"]:
        ids = tok.encode(r, add_special_tokens=False).ids + [EOS]
        rs.append(ids[:budget])
    return q, rs, truncated


# ---------------------------------------------------------------------------
# Model log-probs: one padded row per (query, response)
# ---------------------------------------------------------------------------


def token_logprobs(model, rows):
    """rows: list of (query_ids, response_ids).  Returns a list of float32 1-D tensors (attached to
    the graph): log pi(y_t | x, y_<t) for every response token t."""
    T = max(len(q) + len(r) for q, r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.int64)
    attn = torch.zeros((len(rows), T), dtype=torch.int64)
    for b, (q, r) in enumerate(rows):
        seq = q + r
        ids[b, :len(seq)] = torch.tensor(seq)
        attn[b, :len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits  # [B, T, V] float32
    logp_all = torch.log_softmax(logits, dim=-1)
    out = []
    for b, (q, r) in enumerate(rows):
        # response token t sits at position len(q)+t and is predicted at position len(q)+t-1
        pos = torch.arange(len(q) - 1, len(q) - 1 + len(r))
        tgt = torch.tensor(r)
        out.append(logp_all[b, pos, tgt])
    return out


def unpadded_check(model, rows, got):
    with torch.no_grad():
        for (q, r), g in zip(rows, got):
            seq = torch.tensor([q + r])
            lp = torch.log_softmax(model(input_ids=seq).logits[0], dim=-1)
            want = lp[torch.arange(len(q) - 1, len(q) - 1 + len(r)), torch.tensor(r)]
            assert torch.allclose(g.detach(), want, atol=1e-5, rtol=0), (g, want)


# ---------------------------------------------------------------------------
# The loss, literally
# ---------------------------------------------------------------------------


def positions(scores):
    return [sum(1 for s in scores if s > si) for si in scores]


def query_loss(logp, n, scores, prm):
    """logp: 1-D tensor (k) of summed response log-probs (any float dtype, may need grad);
    n: list of kept token counts.  Returns dict of tensors / python values."""
    lp_exp = prm["length_penalty"]
    k = len(scores)
    denom = torch.tensor([float(ni) ** lp_exp for ni in n], dtype=logp.dtype)
    p = logp / denom
    pos = positions(scores)
    rank = torch.zeros((), dtype=logp.dtype)
    pairs = correct = 0
    for i in range(k):
        for j in range(k):
            if scores[i] < scores[j]:
                term = p[i] - p[j] + prm["margin"] * (pos[i] - pos[j])
                rank = rank + torch.clamp(term, min=0.0)
                pairs += 1
                correct += int(p[i].item() < p[j].item())
    best = max(range(k), key=lambda i: (scores[i], -i))  # first index on ties
    worst = min(range(k), key=lambda i: (scores[i], i))  # first index with the minimum
    if prm["sft_reduction"] == "mean":
        sft = -logp[best] / n[best]
    elif prm["sft_reduction"] == "sum":
        sft = -logp[best]
    else:
        raise ValueError(prm["sft_reduction"])
    loss = prm["rank_weight"] * rank + sft
    return dict(p=p, rank=rank, sft=sft, loss=loss, best=best, worst=worst,
                rank_acc=(correct / pairs) if pairs else None)


def batch_loss_from_p(p_list, n_list, scores_list, prm):
    """Loss as a function of p (leaf tensors): logp_i = p_i * n_i ** length_penalty."""
    losses = []
    for p, n, sc in zip(p_list, n_list, scores_list):
        logp = p * torch.tensor([float(ni) ** prm["length_penalty"] for ni in n], dtype=p.dtype)
        losses.append(query_loss(logp, n, sc, prm)["loss"])
    return torch.stack(losses).mean()


def rank_loss_only(p, scores, margin):
    pos = positions(scores)
    tot = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] < scores[j]:
                tot += max(0.0, p[i] - p[j] + margin * (pos[i] - pos[j]))
    return tot


# ---------------------------------------------------------------------------


def run_case(model, tok, name, prm, records):
    qids, rids, ntrunc = [], [], 0
    for rec in records:
        assert len(rec["responses"]) == len(rec["scores"]) >= 1
        q, rs, tr = tokenize(tok, rec, prm)
        qids.append(q)
        rids.append(rs)
        ntrunc += int(tr)

    rows = [(q, r) for q, rs in zip(qids, rids) for r in rs]
    model.zero_grad(set_to_none=True)
    tlp32 = token_logprobs(model, rows)  # float32, attached
    unpadded_check(model, rows, tlp32)

    # --- float64 reference values (on float32 token log-probs) ---
    exp = dict(query_ids=qids, response_ids=rids, truncated_queries=ntrunc,
               token_logprobs=[], logp=[], n_tokens=[], p=[], rank_loss=[], sft_loss=[],
               rank_acc=[], p_best=[], p_worst=[])
    it = iter(tlp32)
    per_q = []
    for rec, rs in zip(records, rids):
        tl = [next(it).detach().to(torch.float64) for _ in rs]
        logp = torch.stack([t.sum() for t in tl])
        n = [len(r) for r in rs]
        res = query_loss(logp, n, rec["scores"], prm)
        per_q.append((res, n))
        exp["token_logprobs"].append([t.tolist() for t in tl])
        exp["logp"].append(logp.tolist())
        exp["n_tokens"].append(n)
        exp["p"].append(res["p"].tolist())
        exp["rank_loss"].append(res["rank"].item())
        exp["sft_loss"].append(res["sft"].item())
        exp["rank_acc"].append(res["rank_acc"])
        exp["p_best"].append(res["p"][res["best"]].item())
        exp["p_worst"].append(res["p"][res["worst"]].item())
    loss64 = torch.stack([r["loss"] for r, _ in per_q]).mean()
    exp["loss"] = loss64.item()

    # --- dL/dp with p as leaves ---
    p_leaves = [torch.tensor(pq, dtype=torch.float64, requires_grad=True) for pq in exp["p"]]
    L = batch_loss_from_p(p_leaves, exp["n_tokens"], [r["scores"] for r in records], prm)
    assert abs(L.item() - exp["loss"]) <= 1e-12 * max(1.0, abs(exp["loss"])), (L.item(), exp["loss"])
    L.backward()
    exp["dloss_dp"] = [pl.grad.tolist() for pl in p_leaves]

    # --- float32 end to end + parameter gradients (batch2 only) ---
    it = iter(tlp32)
    losses32 = []
    for rec, rs in zip(records, rids):
        logp32 = torch.stack([next(it).sum() for _ in rs])
        losses32.append(query_loss(logp32, [len(r) for r in rs], rec["scores"], prm)["loss"])
    loss32 = torch.stack(losses32).mean()
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - exp["loss"]) < 1e-5 * max(1.0, abs(exp["loss"])), (loss32.item(), exp["loss"])
    grads = None
    if name == "batch2":
        loss32.backward()
        named = dict(model.named_parameters())
        grads = {k: named[k].grad.detach().clone().contiguous() for k in GRAD_PARAMS}
        for k, g in grads.items():
            assert g.dtype == torch.float32 and g.abs().sum() > 0, k
        grads["loss"] = loss32.detach().clone().reshape(())
    model.zero_grad(set_to_none=True)

    case = dict(name=name, params=prm,
                records=[dict(query=r["query"], responses=r["responses"], scores=r["scores"])
                         for r in records],
                expected=exp)
    return case, grads


def sanity(cases):
    c = {x["name"]: x for x in cases}
    # k1: pure SFT
    e = c["k1"]["expected"]
    assert e["rank_loss"] == [0.0] and e["rank_acc"] == [None]
    assert abs(e["loss"] - e["sft_loss"][0]) < 1e-15
    assert abs(e["sft_loss"][0] + e["logp"][0][0] / e["n_tokens"][0][0]) < 1e-15

    # ties: the tied pair (1, 2) contributes nothing; breaking the tie changes the loss
    e = c["ties"]["expected"]
    p, sc = e["p"][0], c["ties"]["records"][0]["scores"]
    assert abs(rank_loss_only(p, sc, 0.0) - e["rank_loss"][0]) < 1e-12
    lo = rank_loss_only(p, [1.0, 2.0, 1.9, 0.0], 0.0)  # adds max(0, p2 - p1)
    hi = rank_loss_only(p, [1.0, 2.0, 2.1, 0.0], 0.0)  # adds max(0, p1 - p2)
    assert abs(lo - e["rank_loss"][0] - max(0.0, p[2] - p[1])) < 1e-12
    assert abs(hi - e["rank_loss"][0] - max(0.0, p[1] - p[2])) < 1e-12
    assert max(lo, hi) > e["rank_loss"][0] + 1e-6, (lo, hi, e["rank_loss"][0])
    assert e["p_best"][0] == p[1] and e["p_worst"][0] == p[3]
    print(f"ties: rank_loss {e['rank_loss'][0]:.6f}; tie broken 2.0->1.9: {lo:.6f}, 2.0->2.1: {hi:.6f}")

    # truncation
    t = c["truncation"]
    prm, e = t["params"], t["expected"]
    q = e["query_ids"][0]
    assert e["truncated_queries"] == 1
    assert q[0] == BOS and len(q) == prm["max_query_len"]
    budget = prm["max_len"] - len(q)
    rs = e["response_ids"][0]
    full = [len(tok_global.encode(r, add_special_tokens=False).ids) + 1 for r in t["records"][0]["responses"]]
    cut = [i for i, f in enumerate(full) if f > budget]
    assert cut, "no response was cut"
    for i in cut:
        assert len(rs[i]) == budget and rs[i][-1] != EOS, rs[i]
    assert rs[1] == [EOS]
    for i, r in enumerate(rs):
        if i not in cut:
            assert r[-1] == EOS
    assert len(rs[2]) == budget and rs[2][-1] == EOS  # exact fit keeps its EOS
    # the full query really was longer, and the kept part is its tail
    fq = tok_global.encode(t["records"][0]["query"], add_special_tokens=True).ids
    assert len(fq) > prm["max_query_len"] and q[1:] == fq[len(fq) - (len(q) - 1):]
    print(f"truncation: query {len(fq)} -> {len(q)} tokens; response lengths {full} -> "
          f"{[len(r) for r in rs]} (budget {budget})")

    # every other case: nothing truncated, every response ends with EOS
    for x in cases:
        if x["name"] != "truncation":
            assert x["expected"]["truncated_queries"] == 0
            for rs in x["expected"]["response_ids"]:
                assert all(r[-1] == EOS for r in rs)


tok_global = None


def main():
    global tok_global
    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    tok_global = tok
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, attn_implementation="eager",
                                                 dtype=torch.float32)
    model.eval()  # no dropout (rates are 0 anyway); gradients still flow
    assert model.config.eos_token_id == EOS and model.config.bos_token_id == BOS

    cases, grads = [], None
    for name, prm, records in CASES:
        case, g = run_case(model, tok, name, prm, records)
        cases.append(case)
        if g is not None:
            grads = g
        e = case["expected"]
        print(f"{name:10s} loss {e['loss']:.6f}  rank {['%.4f' % v for v in e['rank_loss']]}  "
              f"sft {['%.4f' % v for v in e['sft_loss']]}  acc {e['rank_acc']}  n {e['n_tokens']}")
        for pq in e["p"]:
            print(f"{'':10s} p {['%.4f' % v for v in pq]}")
    sanity(cases)

    os.makedirs(OUT, exist_ok=True)
    meta = dict(
        model="tests/fixtures/models/llama",
        bos_id=BOS, eos_id=EOS, pad_id=PAD,
        generator="tools/make_loss_fixtures.py",
        transformers=transformers.__version__, torch=torch.__version__,
        tokenizers=tokenizers.__version__,
        grads_case="batch2", grad_params=GRAD_PARAMS,
        cases=cases,
    )
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    save_file(grads, os.path.join(OUT, "grads_batch2.safetensors"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
