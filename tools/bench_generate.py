"""transformers `generate` reference for `rrhf bench generate`: the same LLaMA, shape and strategies.

Usage: python3 tools/bench_generate.py [--prompts 4] [--prompt-len 64] [--new-tokens 64] [--iters 1]
                                      [--rrhf target/release/rrhf]

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
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--num-beam-groups", type=int, default=4)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated subset: greedy,beam,diverse")
    ap.add_argument("--rrhf", default=None, help="path of the rrhf binary: run `rrhf bench generate` too")
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
