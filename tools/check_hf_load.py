"""Checks that transformers loads a directory written by rrhf (`rrhf convert`, `rrhf train`) with no missing,
unexpected or mismatched weights, and that its log-probs equal rrhf's.

Usage: python3 tools/check_hf_load.py DIR "some text" [RRHF_JSON_LINE]
RRHF_JSON_LINE is the output of `rrhf logprobs --model DIR --text TEXT --json`; when given, the per-token
log-probs must agree within 1e-3.
"""
import json
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM


def main():
    d, text = sys.argv[1], sys.argv[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"FAIL: loading info not empty: {bad}")
    weight_warnings = [str(w.message) for w in caught if "weight" in str(w.message).lower()]
    if weight_warnings:
        sys.exit(f"FAIL: warnings about weights: {weight_warnings}")
    print(f"ok: {d} loads in transformers with no missing/unexpected/mismatched weights")
    if len(sys.argv) > 3:
        ours = json.loads(sys.argv[3])
        ids = torch.tensor([ours["ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        theirs = lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        diff = max(abs(a - b) for a, b in zip(ours["logprobs"], theirs))
        print(f"max |rrhf - transformers| per-token log-prob: {diff:.2e} over {len(theirs)} tokens")
        if diff > 1e-3:
            sys.exit("FAIL: log-probs differ")


if __name__ == "__main__":
    main()
