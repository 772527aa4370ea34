#!/usr/bin/env python3
"""Reference fixtures for the optimizer pieces (src/train/optim.rs, src/train/schedule.rs).

Writes
  tests/fixtures/optim/adamw.safetensors  float32 tensors:
      init.{name}                 initial parameters
      grad{k}.{name}              gradient fed at step k (k = 0..4)
      after{k}.{name}             parameters after step k
      clip.in.{name}              gradients before clipping (one set, reused for every max_norm)
      clip{j}.{name}              clip.in after torch.nn.utils.clip_grad_norm_(…, max_norm = clip_max_norms[j])
  tests/fixtures/optim/adamw.json scalars: config, per-step lrs, parameter names and weight decay groups,
      clip max_norms and returned norms, scheduler learning rates (transformers' LambdaLR schedulers, base lr
      `schedule.base_lr`, lr used for update s = get_last_lr() after s scheduler.step() calls), and
      warm-up steps from TrainingArguments.get_warmup_steps for a few (ratio, total) pairs.

torch.optim.AdamW (single-tensor CPU path, the one torch picks on CPU), weight_decay 0.1 for `w.weight`, 0 for
`x.bias` and `norm.weight` (as the HF Trainer groups them), betas (0.9, 0.95), eps 1e-8.

Run:  tools/.venv/bin/python tools/make_optim_fixtures.py   (deterministic, CPU, float32)
"""

import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import TrainingArguments
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "optim")

torch.manual_seed(1234)
torch.set_num_threads(1)

SHAPES = {"x.bias": [7], "norm.weight": [5], "w.weight": [4, 6]}
NAMES = list(SHAPES)
NO_DECAY = {"x.bias", "norm.weight"}
BETAS = (0.9, 0.95)
EPS = 1e-8
WD = 0.1
LRS = [1e-2, 5e-2, 3e-2, 0.0, 2e-2]


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    params = {}
    for n, s in SHAPES.items():
        p = torch.randn(*s, dtype=torch.float32)
        if n == "norm.weight":
            p = p * 0.1 + 1.0
        params[n] = torch.nn.Parameter(p.clone())
        tensors[f"init.{n}"] = p.clone()
    groups = [
        {"params": [params[n] for n in NAMES if n not in NO_DECAY], "weight_decay": WD},
        {"params": [params[n] for n in NAMES if n in NO_DECAY], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LRS[0], betas=BETAS, eps=EPS)
    for k, lr in enumerate(LRS):
        for n in NAMES:
            # varied magnitudes per step, some exact zeros
            g = torch.randn(*SHAPES[n]) * (10.0 ** (k % 3 - 1))
            if k == 2:
                g.view(-1)[0] = 0.0
            tensors[f"grad{k}.{n}"] = g.clone()
            params[n].grad = g.clone()
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.step()
        for n in NAMES:
            tensors[f"after{k}.{n}"] = params[n].detach().clone()

    clip_in = {n: torch.randn(*SHAPES[n]) * 0.7 for n in NAMES}
    for n in NAMES:
        tensors[f"clip.in.{n}"] = clip_in[n].clone()
    clip_max = [1.0, 100.0, 0.25]
    clip_norms = []
    for j, mx in enumerate(clip_max):
        ps = [torch.nn.Parameter(torch.zeros(*SHAPES[n])) for n in NAMES]
        for p, n in zip(ps, NAMES):
            p.grad = clip_in[n].clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, mx)
        clip_norms.append(float(norm))
        for p, n in zip(ps, NAMES):
            tensors[f"clip{j}.{n}"] = p.grad.clone()

    base_lr = 2e-5
    sched = {"base_lr": base_lr, "warmup": 3, "total": 10}
    makers = {
        "linear": lambda o: get_linear_schedule_with_warmup(o, 3, 10),
        "cosine": lambda o: get_cosine_schedule_with_warmup(o, 3, 10),
        "constant": lambda o: get_constant_schedule_with_warmup(o, 3),
    }
    for kind, make in makers.items():
        o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
        s = make(o)
        lrs = []
        for _ in range(14):
            lrs.append(s.get_last_lr()[0])
            o.step()
            s.step()
        sched[kind] = lrs

    warm = []
    for ratio, total in [(0.03, 1000), (0.03, 33), (0.1, 10), (0.0, 50), (0.5, 7), (0.03, 2343), (0.07, 100)]:
        args = TrainingArguments(output_dir="/tmp/unused", warmup_ratio=ratio, report_to=[])
        warm.append({"ratio": ratio, "total": total, "steps": args.get_warmup_steps(total)})

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "adamw.safetensors"))
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "names": NAMES,
        "no_decay": sorted(NO_DECAY),
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WD,
        "lrs": LRS,
        "clip_max_norms": clip_max,
        "clip_norms": clip_norms,
        "schedule": sched,
        "warmup_steps": warm,
    }
    with open(os.path.join(OUT, "adamw.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
