"""transformers `generate` reference for `rrhf bench generate`: the same LLaMA, shape and strategies.

Usage: python3 tools/bench_generate.py [--prompts 4] [--prompt-len 64] [--new-tokens 64] [--iters 1]
                                      [--rrhf target/release/rrhf]
       python3 tools/bench_generate.py --model DIR --prompts FILE --rrhf BIN [--max-new-tokens 48]
                                      [--strategy greedy,beam] [--num-beams 4]

With --model (a real model; --rrhf required): `rrhf bench generate --model DIR --prompts FILE --json` decodes the
prompts one at a time and reports its prompt ids and generated ids; this script then runs transformers' `generate`
on the same prompt ids, one at a time, with the same settings (greedy; beam search with length penalty 1.0 and
early_stopping=False, rrhf's defaults; stop at the model's eos ids; at most --max-new-tokens), prints both
tokens/s, the ratios, and whether every prompt's ids are equal (a mismatch is shown with the first differing
position: float near-ties between two tokens can flip a choice).

With --rrhf it first runs `rrhf bench generate` with the same shape and iterations, prints both tables and the
ratios (rrhf tokens/s over transformers tokens/s), so both numbers come from the same machine in the same run.

The model is the forward benchmark's LLaMA (hidden 512, 8 layers, 8 heads, vocab 32000) with random weights (seed 0),
f32 on the CPU, default (sdpa) attention, KV cache on. `min_new_tokens = max_new_tokens`, so every sequence has
exactly the requested length, as in rrhf (which runs without a stop id). Group (diverse) beam search is built into
transformers up to 4.55; later releases fetch it from the hub ("transformers-community/group-beam-search"), which
needs the network: that row then reads "n/a". Run the script with a 4.x interpreter (see
tools/make_generate_fixtures.py) to time it.
"""
import argparse
import subprocess
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="4", help="a count (random LLaMA) or, with --model, a prompts file")
    ap.add_argument("--model", default=None, help="a Hugging Face model dir: the real-model benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--strategy", default="greedy,beam")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--num-beam-groups", type=int, default=4)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated subset: greedy,beam,diverse")
    ap.add_argument("--rrhf", default=None, help="path of the rrhf binary: run `rrhf bench generate` too")
    ap.add_argument("--decode-dtype", default="f32", choices=["f32", "bf16"],
                    help="with --model: rrhf decodes with bf16 copies of the matrices (an approximation: ids may "
                         "differ from transformers' f32 ones)")
    a = ap.parse_args()
    if a.model:
        return real(a)
    a.prompts = int(a.prompts)
    rrhf_rows = {}
    if a.rrhf:
        out = subprocess.run([a.rrhf, "bench", "generate", "--prompts", str(a.prompts), "--prompt-len",
                              str(a.prompt_len), "--new-tokens", str(a.new_tokens), "--iters", str(a.iters)],
                             check=True, capture_output=True, text=True).stdout
        print(out, end="")
        for line in out.splitlines()[2:]:
            parts = line.rsplit(None, 2)
            if len(parts) == 3:
                rrhf_rows[parts[0].strip()] = float(parts[2])
        print()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 32000, (a.prompts, a.prompt_len))
    mask = torch.ones_like(ids)
    nb, ng = a.num_beams, a.num_beam_groups
    strategies = [
        ("greedy", "greedy", dict(do_sample=False, num_beams=1)),
        ("beam", f"beam {nb}", dict(do_sample=False, num_beams=nb, length_penalty=1.0, early_stopping=False)),
        ("diverse", f"diverse beam {nb}x{ng}", dict(do_sample=False, num_beams=nb, num_beam_groups=ng,
                                                 diversity_penalty=1.0, length_penalty=1.0, early_stopping=False)),
    ]
    only = set(a.only.split(",")) if a.only else None

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{model.config._attn_implementation} attention, f32, {a.prompts} prompts x {a.prompt_len} tokens, "
          f"{a.new_tokens} new tokens")
    print(f"{'pass':<20} {'seconds':>10} {'tokens/s':>12}")
    hf_rows = {}
    for key, name, kw in strategies:
        if only and key not in only:
            continue

        def run(n):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      num_return_sequences=1, pad_token_id=0, **kw)

        try:
            run(min(4, a.new_tokens))
        except Exception as e:  # group beam search needs the hub in transformers >= 4.56
            print(f"{name:<20} {'n/a':>10} {'n/a':>12}   ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        ts = []
        for _ in range(max(a.iters, 1)):
            t0 = time.perf_counter()
            out = run(a.new_tokens)
            ts.append(time.perf_counter() - t0)
            assert out.shape == (a.prompts, a.prompt_len + a.new_tokens), out.shape
        ts.sort()
        s = ts[len(ts) // 2]
        print(f"{name:<20} {s:>10.3f} {a.prompts * a.new_tokens / s:>12.1f}")
        hf_rows[name] = a.prompts * a.new_tokens / s
    if rrhf_rows:
        print(f"\n{'pass':<20} {'rrhf tok/s':>12} {'hf tok/s':>12} {'ratio':>8}")
        for name, r in rrhf_rows.items():
            h = hf_rows.get(name)
            ratio = f"{r / h:>7.2f}x" if h else f"{'n/a':>8}"
            hs = f"{h:>12.1f}" if h else f"{'n/a':>12}"
            print(f"{name:<20} {r:>12.1f} {hs} {ratio}")


def real(a):
    import json

    if not a.rrhf:
        raise SystemExit("--model needs --rrhf BIN (the prompt ids come from rrhf's tokenizer)")
    out = subprocess.run([a.rrhf, "bench", "generate", "--model", a.model, "--prompts", a.prompts,
                          "--max-new-tokens", str(a.max_new_tokens), "--strategy", a.strategy,
                          "--num-beams", str(a.num_beams), "--decode-dtype", a.decode_dtype, "--json"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    prompts = r["prompts"]
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{model.config._attn_implementation} attention, f32; {a.model}, {len(prompts)} prompts one at a time, "
          f"at most {a.max_new_tokens} new tokens, stop ids {r['stop_ids']}; rrhf decode weights {a.decode_dtype}")
    kws = {
        "greedy": dict(do_sample=False, num_beams=1),
        "beam": dict(do_sample=False, num_beams=r["num_beams"], length_penalty=r["length_penalty"],
                     early_stopping=r["early_stopping"]),
    }

    def gen(p, n, kw):
        ids = torch.tensor([p])
        with torch.no_grad():
            o = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               eos_token_id=r["stop_ids"], pad_token_id=r["pad_id"], num_return_sequences=1,
                               temperature=None, top_p=None, top_k=None, **kw)
        return o[0, len(p):].tolist()

    print(f"\n{'strategy':<12} {'rrhf tok/s':>11} {'hf tok/s':>10} {'ratio':>7}  ids")
    for row in r["rows"]:
        key = "greedy" if row["name"] == "greedy" else "beam"
        kw = kws[key]
        gen(prompts[0], min(4, a.max_new_tokens), kw)
        t0 = time.perf_counter()
        hf = [gen(p, a.max_new_tokens, kw) for p in prompts]
        s = time.perf_counter() - t0
        hf_tps = sum(map(len, hf)) / s
        bad = []
        for i, (x, y) in enumerate(zip(row["ids"], hf)):
            if x != y:
                at = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
                bad.append(f"prompt {i} from token {at} (rrhf {len(x)}, hf {len(y)} tokens)")
        same = "equal" if not bad else f"{len(bad)} differ: " + "; ".join(bad)
        print(f"{row['name']:<12} {row['tokens_per_s']:>11.1f} {hf_tps:>10.1f} {row['tokens_per_s'] / hf_tps:>6.2f}x  {same}")


if __name__ == "__main__":
    main()
