"""PyTorch reference for `rrhf bench train`: RRHF optimizer steps laid out as the original RRHF code does (k padded
rows [query, response_i] per query, full log-softmax over the vocabulary, torch AdamW), the same loss.

Without --model: one step on the synthetic LLaMA of `rrhf bench train` (k = 4).
    python3 tools/bench_train.py [--iters 3]
With --model DIR --data FILE: steps on a real Hugging Face model and scored RRHF records, tokenised as `rrhf train`
does (query with special tokens, response + EOS, the same truncation). With --rrhf BIN it first runs
`rrhf bench train` on the same model, data and settings in a separate process, then prints both and the ratios:
    python3 tools/bench_train.py --model runs/smollm2 --data runs/bench/hh_like.jsonl --max-len 512 \
        --batch-queries 1 --iters 4 --rrhf target/release/rrhf
"""
import argparse
import json
import resource
import subprocess
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

Q, K, QL, RL, V = 2, 4, 128, 64, 32000


def tokenized(tok, path, max_len, max_query_len):
    """Records tokenised by rrhf's contract (design.md, "Tokenisation")."""
    eos = tok.eos_token_id
    bos = tok.bos_token_id
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            q = tok(r["query"], add_special_tokens=True)["input_ids"]
            if len(q) > max_query_len:
                keep_bos = bool(q) and bos is not None and q[0] == bos
                q = ([bos] if keep_bos else []) + q[len(q) - max_query_len + (1 if keep_bos else 0):]
            budget = max_len - len(q)
            resp = [(tok(y, add_special_tokens=False)["input_ids"] + [eos])[:budget] for y in r["responses"]]
            out.append((q, resp, [float(s) for s in r["scores"]]))
    return out


def real(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    mql = a.max_query_len if a.max_query_len else max(a.max_len - 64, a.max_len // 2)
    records = tokenized(tok, a.data, a.max_len, mql)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_compute = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "wte" not in n)
    if model.config.tie_word_embeddings:
        n_compute += model.get_output_embeddings().weight.numel()

    def step(chunk):
        rows, spans, scores = [], [], []
        for q, resp, sc in chunk:
            for y in resp:
                spans.append((len(q), len(y)))
                rows.append(q + y)
            scores.append(torch.tensor(sc))
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp_all = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        lab = torch.zeros_like(lp_all)
        for i, (ql, yl) in enumerate(spans):
            lab[i, ql - 1:ql - 1 + yl] = 1
        logp = (lp_all * lab).sum(-1)
        lens = lab.sum(-1).clamp(min=1)
        loss, at = 0.0, 0
        for sc in scores:
            k = len(sc)
            p = logp[at:at + k] / lens[at:at + k]
            diff = p[:, None] - p[None, :]
            worse = sc[:, None] < sc[None, :]
            rank = torch.relu(diff)[worse].sum()
            best = int(sc.argmax())
            sft = -logp[at + best] / lens[at + best]
            loss = loss + rank + sft
            at += k
        loss = loss / len(scores)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return ids.numel(), int(lab.sum())

    times, tokens, resp_tokens = [], 0, 0
    u0 = None
    for i in range(a.warmup + a.iters):
        if i == a.warmup:
            u0 = resource.getrusage(resource.RUSAGE_SELF)
        chunk = [records[(i * a.batch_queries + j) % len(records)] for j in range(a.batch_queries)]
        t0 = time.perf_counter()
        n, nr = step(chunk)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens += n
            resp_tokens += nr
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    s = times[len(times) // 2]
    it = max(a.iters, 1)
    return {
        "engine": f"PyTorch {torch.__version__}", "steps": a.iters, "step_s": s, "row_tokens": tokens / it,
        "response_tokens": resp_tokens / it, "response_tokens_per_s": resp_tokens / it / s,
        "gflops": 6 * n_compute * tokens / it / s / 1e9, "compute_params": n_compute,
        "user_s": (u1.ru_utime - u0.ru_utime) / it, "sys_s": (u1.ru_stime - u0.ru_stime) / it,
        "minor_faults": (u1.ru_minflt - u0.ru_minflt) / it, "max_rss": u1.ru_maxrss * 1024,
    }


def print_rows(rows):
    print(f"{'engine':<16} {'s/step':>8} {'row tok':>8} {'resp tok/s':>11} {'GFLOP/s':>8} {'peak RSS':>9} "
          f"{'user s':>7} {'sys s':>7} {'faults':>9}")
    for r in rows:
        print(f"{r['engine']:<16} {r['step_s']:>8.3f} {r['row_tokens']:>8.0f} {r['response_tokens_per_s']:>11.1f} "
              f"{r['gflops']:>8.1f} {r['max_rss'] / 1e9:>7.2f}GB {r['user_s']:>7.2f} {r['sys_s']:>7.2f} "
              f"{r['minor_faults']:>9.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--model", default=None, help="a Hugging Face model directory (e.g. from `rrhf convert`)")
    ap.add_argument("--data", default=None, help="scored RRHF records (JSONL)")
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--max-query-len", type=int, default=None)
    ap.add_argument("--batch-queries", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rrhf", default=None, help="path of the rrhf binary: run `rrhf bench train` too")
    ap.add_argument("--rrhf-args", default="", help="extra flags for `rrhf bench train` (e.g. '--grad-checkpoint')")
    a = ap.parse_args()
    if a.model:
        if not a.data:
            raise SystemExit("--model needs --data")
        rows = []
        if a.rrhf:
            cmd = [a.rrhf, "bench", "train", "--model", a.model, "--data", a.data, "--max-len", str(a.max_len),
                   "--batch-queries", str(a.batch_queries), "--iters", str(a.iters), "--warmup", str(a.warmup),
                   "--json"] + a.rrhf_args.split()
            if a.max_query_len:
                cmd += ["--max-query-len", str(a.max_query_len)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        rows.append(real(a))
        print(f"one RRHF optimizer step: {a.model} on {a.data}, {a.batch_queries} queries per step, max len "
              f"{a.max_len}, median of {a.iters} steps after {a.warmup} warm-up; {torch.get_num_threads()} threads; "
              f"GFLOP/s = 6 · N (matrices incl. the output layer) · tokens computed (padding included) / s")
        print_rows(rows)
        if len(rows) == 2:
            r, p = rows
            print(f"\nrrhf ÷ PyTorch: speed (s/step) {p['step_s'] / r['step_s']:.2f}×, GFLOP/s "
                  f"{r['gflops'] / p['gflops']:.2f}×, peak RSS {r['max_rss'] / p['max_rss']:.2f}×, "
                  f"sys/user rrhf {r['sys_s'] / max(r['user_s'], 1e-9):.2f} PyTorch "
                  f"{p['sys_s'] / max(p['user_s'], 1e-9):.2f}")
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    queries = torch.randint(0, V, (Q, QL))
    responses = torch.randint(0, V, (Q, K, RL))
    ids = torch.cat([queries[:, None].expand(Q, K, QL), responses], -1).reshape(Q * K, QL + RL)
    scores = torch.arange(K, dtype=torch.float32)

    def step():
        logits = model(input_ids=ids).logits[:, QL - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, QL:, None])[..., 0]
        logp = lp.sum(-1).reshape(Q, K)
        p = logp / RL
        diff = p[:, :, None] - p[:, None, :]           # p_i - p_j
        worse = scores[:, None] < scores[None, :]      # r_i < r_j
        rank = torch.relu(diff)[:, worse].sum(-1)
        best = scores.argmax()
        sft = -logp[:, best] / RL
        loss = (rank + sft).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    ts = []
    for _ in range(max(a.iters, 1)):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    s = ts[len(ts) // 2]
    print(f"PyTorch {torch.__version__}, transformers {__import__('transformers').__version__}, {torch.get_num_threads()} threads")
    print(f"{'pass':<20} {'seconds':>10} {'tokens/s':>12}")
    print(f"{'padded (' + str(Q * K * (QL + RL)) + ' tokens)':<20} {s:>10.3f} {Q * K * RL / s:>12.1f}")


if __name__ == "__main__":
    main()
