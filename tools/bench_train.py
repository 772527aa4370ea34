"""PyTorch reference for `rrhf bench train`: one RRHF optimizer step on the same LLaMA shape, k = 4 responses per
query laid out as padded rows [query, response_i] (as the original RRHF code does), the same loss and AdamW.

Usage: python3 tools/bench_train.py [--iters 3]
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

Q, K, QL, RL, V = 2, 4, 128, 64, 32000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
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
