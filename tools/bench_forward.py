"""PyTorch / transformers reference for `rrhf bench forward`: the same LLaMA shape, the same two passes.

Usage: python3 tools/bench_forward.py [--iters 3] [--batch 4] [--seq-len 256]
Prints a table like rrhf's; tools/bench.sh runs both and prints the ratios.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 32000, (a.batch, a.seq_len))
    labels = ids[:, 1:]

    def label_logprobs():
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def fwd():
        with torch.no_grad():
            label_logprobs().sum().item()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        (-label_logprobs().mean()).backward()

    def timed(f):
        f()
        ts = []
        for _ in range(max(a.iters, 1)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]

    tokens = a.batch * a.seq_len
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, eager attention, f32")
    print(f"{'pass':<20} {'seconds':>10} {'tokens/s':>12}")
    for name, f in [("forward", fwd), ("forward+backward", fwd_bwd)]:
        s = timed(f)
        print(f"{name:<20} {s:>10.3f} {tokens / s:>12.1f}")


if __name__ == "__main__":
    main()
