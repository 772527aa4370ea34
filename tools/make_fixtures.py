#!/usr/bin/env python3
"""Reference-fixture generator for rrhf (Rust/candle causal LMs vs Hugging Face transformers).

Writes everything under tests/fixtures/ (overwriting):
  tokenizer.json, tokenizer_ids.json
  models/<name>/{config.json, generation_config.json, model.safetensors,
                 tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                 cases.safetensors, cases.json}
Optionally (``--smollm2 PATH.gguf``) also tests/fixtures/smollm2_reference.json.

Deterministic: all randomness comes from fixed seeds; run with the versions pinned in
tools/requirements-fixtures.txt.  See tests/fixtures/README.md for the format.
"""

import argparse
import json
import os
import random
import shutil
import sys

import torch
import tokenizers
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
UNK, BOS, EOS, PAD = 0, 1, 2, 3
VOCAB_TARGET = 320
NEG = torch.finfo(torch.float32).min
ATOL = 1e-5

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # bit-stable CPU reductions

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_SENTENCES = """\
The cat sat on the mat.
A dog ran across the park in the morning.
She reads a book every night before bed.
We walked to the station and waited for the train.
The weather is nice today, so let's go outside.
He wrote a letter to his mother.
They are learning to play the piano.
The sun rises in the east and sets in the west.
My favourite colour is blue, but I also like green.
Please close the door when you leave the room.
The children laughed at the funny clown.
It was raining, so we stayed at home.
Coffee tastes better with a little milk.
The river flows into the sea.
There are seven days in a week.
I think that the answer is correct.
Can you help me carry these boxes?
The small bird sang a happy song.
Our teacher gave us a lot of homework.
The old man told a story about the war.
Reading is one of the best ways to learn.
The quick brown fox jumps over the lazy dog.
Water boils at one hundred degrees.
The library opens at nine in the morning.
She planted flowers in the garden.
The computer was too slow to run the game.
He forgot his keys at the office.
We should eat more fruit and vegetables.
The movie was longer than we expected.
The moon is bright tonight.
Learning a new language takes time and practice.
The shop sells bread, cheese and fresh fish.
They built a house near the lake.
My brother is taller than me.
The meeting starts at ten o'clock.
This is the first time I have seen snow.
The train was late again this morning.
A good friend is hard to find.
The students listened carefully to the lecture.
Thank you for your kind words.
I would like a cup of tea, please.
The city is very busy during the day.
Every story has a beginning, a middle and an end.
The baby is sleeping in the next room.
He likes to run in the park after work.
The road to the village is long and narrow.
We had dinner with our friends on Friday.
The answer to the question is not simple.
The painting shows a ship on a stormy sea.
Time flies when you are having fun.
"""

_DIALOGUES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Can you tell me a joke?", "Why did the chicken cross the road? To get to the other side."),
    ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a short poem about the sea.", "The sea is wide, the sea is deep, it sings the sailors off to sleep."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
    ("How are you today?", "I am doing well, thank you for asking."),
    ("What should I cook for dinner?", "You could make a simple pasta with tomato sauce."),
    ("Explain what a computer is.", "A computer is a machine that follows instructions to process data."),
    ("Is it going to rain tomorrow?", "I do not know the weather, but you can check a forecast."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("Translate hello into French.", "Hello in French is bonjour."),
]


def build_corpus():
    sents = [s for s in _SENTENCES.splitlines() if s.strip()]
    rng = random.Random(1234)
    corpus = list(sents)
    # a few hundred extra lines made of pairs of sentences
    for _ in range(200):
        a, b = rng.sample(sents, 2)
        corpus.append(a + " " + b)
    for h, a in _DIALOGUES:
        corpus.append(f"\n\nHuman: {h}\n\nAssistant: {a}")
    for _ in range(60):
        (h1, a1), (h2, a2) = rng.sample(_DIALOGUES, 2)
        corpus.append(f"\n\nHuman: {h1}\n\nAssistant: {a1}\n\nHuman: {h2}\n\nAssistant: {a2}")
    return corpus


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s>:1 $B:1",
        special_tokens=[("<s>", BOS)],
    )
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


TOKENIZER_TEXTS = [
    "Hello world",
    "",
    "   leading spaces and trailing ",
    "naïve café 😀",
    "Numbers: 12345, 3.14 and 2024-01-01",
    "\n\nHuman: What is two plus two?\n\nAssistant: Two plus two is four.",
    "line one\nline two\r\n\ttabbed",
    "The quick brown fox jumps over the lazy dog.",
]


def write_tokenizer(tok):
    path = os.path.join(FIX, "tokenizer.json")
    tok.save(path)
    tok2 = Tokenizer.from_file(path)
    cases = []
    for text in TOKENIZER_TEXTS:
        for add in (True, False):
            ids = tok2.encode(text, add_special_tokens=add).ids
            cases.append({"text": text, "add_special_tokens": add, "ids": ids})
            if not add:
                assert tok2.decode(ids) == text, (text, tok2.decode(ids))
    with open(os.path.join(FIX, "tokenizer_ids.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return tok2


def hf_tokenizer(tok):
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def model_configs(V):
    common = dict(
        vocab_size=V,
        initializer_range=0.1,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    llama = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        attention_dropout=0.0,
        hidden_act="silu",
        **common,
    )
    llama_tied = dict(llama)
    llama_tied.update(
        tie_word_embeddings=True,
        rope_theta=500000.0,
        num_key_value_heads=1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    gpt2 = dict(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        **common,
    )
    neox = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.5,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        max_position_embeddings=128,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        **common,
    )
    neox_seq = dict(neox)
    neox_seq.update(use_parallel_residual=False, rotary_pct=0.25)
    return [
        ("llama", LlamaConfig(**llama), True),
        ("llama_tied", LlamaConfig(**llama_tied), True),
        ("gpt2", GPT2Config(**gpt2), False),
        ("gpt_neox", GPTNeoXConfig(**neox), False),
        ("gpt_neox_seq", GPTNeoXConfig(**neox_seq), False),
    ]


def make_model(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # HF initialises every norm weight to 1 and every bias to 0, which would let a Rust
    # implementation that ignores them pass.  Perturb all 1-D parameters (norm weights,
    # norm biases, linear biases) so that they matter.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def labels_from(ids, real):
    B, T = ids.shape
    labels = torch.full((B, T), -100, dtype=torch.int64)
    ok = (real[:, :-1] == 1) & (real[:, 1:] == 1)
    labels[:, :-1] = torch.where(ok, ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return labels


def padded_mask(real):
    """causal AND key real, plus the diagonal (so no row is empty)."""
    B, T = real.shape
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    m = causal[None] & (real[:, None, :] == 1)
    m = m | torch.eye(T, dtype=torch.bool)[None]
    return m.to(torch.uint8)


def rand_ids(g, B, T, V):
    return torch.randint(4, V, (B, T), generator=g, dtype=torch.int64)


def build_cases(V, with_long_pos, seed):
    g = torch.Generator().manual_seed(seed)
    cases = {}
    B, T = 2, 10

    # 1. plain
    ids = rand_ids(g, B, T, V)
    real = torch.ones(B, T, dtype=torch.uint8)
    cases["plain"] = dict(
        input_ids=ids,
        position_ids=torch.arange(T).expand(B, T).clone(),
        mask=padded_mask(real),
        real=real,
        labels=labels_from(ids, real),
    )

    # 2. left_pad / 3. right_pad
    for name, npad, left in (("left_pad", 3, True), ("right_pad", 4, False)):
        ids = rand_ids(g, B, T, V)
        real = torch.ones(B, T, dtype=torch.uint8)
        if left:
            real[1, :npad] = 0
        else:
            real[1, T - npad :] = 0
        ids = torch.where(real == 1, ids, torch.full_like(ids, PAD))
        pos = torch.clamp(torch.cumsum(real.to(torch.int64), -1) - 1, min=0)
        cases[name] = dict(
            input_ids=ids,
            position_ids=pos,
            mask=padded_mask(real),
            real=real,
            labels=labels_from(ids, real),
        )

    # 4. custom: packed [query(4) | A(3) | B(3)]
    Q, R = 4, 3
    T = Q + 2 * R
    ids = rand_ids(g, 1, T, V)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6]], dtype=torch.int64)
    seg = torch.tensor([0] * Q + [1] * R + [2] * R)
    m = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            if seg[k] == 0 or seg[k] == seg[q]:
                m[q, k] = True
    labels = torch.full((1, T), -100, dtype=torch.int64)
    for t in range(Q):  # query positions: next query token, last query -> first of A
        labels[0, t] = ids[0, t + 1]
    for start in (Q, Q + R):
        for t in range(start, start + R - 1):
            labels[0, t] = ids[0, t + 1]
    cases["custom"] = dict(
        input_ids=ids,
        position_ids=pos,
        mask=m[None].to(torch.uint8),
        real=torch.ones(1, T, dtype=torch.uint8),
        labels=labels,
    )

    # 5. long_pos (llama only): positions 40..47
    if with_long_pos:
        T = 8
        ids = rand_ids(g, 1, T, V)
        real = torch.ones(1, T, dtype=torch.uint8)
        cases["long_pos"] = dict(
            input_ids=ids,
            position_ids=torch.arange(40, 40 + T)[None].clone(),
            mask=padded_mask(real),
            real=real,
            labels=labels_from(ids, real),
        )
    return cases


def additive(mask_u8):
    """uint8 [B,T,T] -> float additive [B,1,T,T]: 0 allowed, finfo.min not."""
    m = mask_u8.to(torch.bool)[:, None]
    return torch.where(m, torch.zeros((), dtype=torch.float32), torch.tensor(NEG, dtype=torch.float32))


def forward(model, ids, pos, attn):
    return model(input_ids=ids, position_ids=pos, attention_mask=attn, use_cache=False).logits


def loss_of(logits, labels, real):
    lp = torch.log_softmax(logits, dim=-1)
    has = labels != -100
    gathered = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    label_lp = torch.where(has, gathered, torch.zeros_like(gathered))
    nll = -label_lp.sum() / has.sum()
    reg = logits[real.to(torch.bool)].pow(2).mean()
    return nll + 0.01 * reg, label_lp


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


def maxdiff(a, b):
    return (a - b).abs().max().item()


# Gradients are recorded for a handful of parameters per model (every kind of layer on the gradient path: an attention
# projection, an MLP matrix, a norm, the embedding and the output layer); all of them would not fit in 2 MB.
GRAD_PARAMS = {
    "llama": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
              "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"],
    "llama_tied": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.1.input_layernorm.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
             "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.ln_2.bias", "transformer.ln_f.weight"],
    "gpt_neox": ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight",
                 "gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "gpt_neox.layers.1.post_attention_layernorm.bias",
                 "gpt_neox.final_layer_norm.weight", "embed_out.weight"],
    "gpt_neox_seq": ["gpt_neox.layers.0.attention.query_key_value.weight",
                     "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
                     "gpt_neox.layers.1.post_attention_layernorm.weight"],
}


def run_case(model, name, c, want_grads):
    ids, pos, real = c["input_ids"], c["position_ids"], c["real"]
    # Canonical run: the exact mask the Rust side receives, as a 4D additive float mask.
    model.zero_grad(set_to_none=True)
    logits = forward(model, ids, pos, additive(c["mask"]))
    loss, label_lp = loss_of(logits, c["labels"], real)
    out = dict(c)
    out["logits"] = logits.detach().clone()
    out["label_logprobs"] = label_lp.detach().clone()
    out["loss"] = loss.detach().clone().reshape(())
    if want_grads:
        loss.backward()
        params = dict(model.named_parameters())
        for pname in want_grads:
            assert params[pname].grad is not None, pname
            out["grad." + pname] = params[pname].grad.detach().clone()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        if name != "custom":
            # The usual transformers path: 2D attention_mask = real, explicit position_ids.
            l2 = forward(model, ids, pos, real.to(torch.int64))
            r = real.to(torch.bool)
            assert close(l2[r], logits[r]), (name, "2D vs 4D", maxdiff(l2[r], logits[r]))
            loss2, _ = loss_of(l2, c["labels"], real)
            assert abs(loss2.item() - loss.item()) < ATOL, (name, loss2.item(), loss.item())
            if name in ("plain", "long_pos"):
                # and without any mask (HF builds its own causal mask)
                l0 = forward(model, ids, pos, None)
                assert close(l0, logits), (name, "no-mask vs 4D", maxdiff(l0, logits))
        else:
            # transformers must really honour the packed 4D mask: each segment run alone
            # (query + that response, normal positions 0..6) must give the same logits.
            Q, R = 4, 3
            for start in (Q, Q + R):
                sel = list(range(Q)) + list(range(start, start + R))
                sub_ids = ids[:, sel]
                sub_pos = torch.arange(len(sel))[None]
                ls = forward(model, sub_ids, sub_pos, None)
                assert close(ls, logits[:, sel]), (name, "packed vs unpacked", start, maxdiff(ls, logits[:, sel]))
            # sanity: the mask makes a difference (B must not see A)
            lc = forward(model, ids, pos, additive(torch.tril(torch.ones(1, ids.shape[1], ids.shape[1])).to(torch.uint8)))
            assert maxdiff(lc[:, Q + R :], logits[:, Q + R :]) > 1e-3, "custom mask had no effect"
    return out


CONFIG_VARIANTS = ("llama_tied", "gpt_neox_seq")


def save_model_dir(name, config, with_long_pos, hf_tok, seed, grad_cases):
    d = os.path.join(FIX, "models", name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model = make_model(config, seed)
    model.save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)

    cases = build_cases(config.vocab_size, with_long_pos, seed + 100)
    if name in CONFIG_VARIANTS:
        # Variants differ from their base model only in config (tied head, rope scaling, sequential residual):
        # the padding cases add nothing there, and dropping them keeps the fixtures under 2 MB.
        cases = {k: v for k, v in cases.items() if k not in ("left_pad", "right_pad")}
    tensors = {}
    for cname, c in cases.items():
        out = run_case(model, cname, c, GRAD_PARAMS[name] if cname in grad_cases else [])
        for field, t in out.items():
            t = t.contiguous()
            if field in ("mask", "real"):
                assert t.dtype == torch.uint8
            tensors[f"{cname}.{field}"] = t
    save_file(tensors, os.path.join(d, "cases.safetensors"))
    meta = {
        "cases": list(cases.keys()),
        "grad_cases": grad_cases,
        "vocab_size": config.vocab_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")

    # reload check: from_pretrained must give identical outputs
    re = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    names_a = [n for n, _ in model.named_parameters()]
    names_b = [n for n, _ in re.named_parameters()]
    assert names_a == names_b, (names_a, names_b)
    with torch.no_grad():
        for cname, c in cases.items():
            l = forward(re, c["input_ids"], c["position_ids"], additive(c["mask"]))
            assert torch.equal(l, tensors[f"{cname}.logits"]), (name, cname, "reload", maxdiff(l, tensors[f"{cname}.logits"]))
    nparams = sum(p.numel() for p in model.parameters())
    print(f"  {name}: {nparams} params, cases {list(cases)}", flush=True)


# ---------------------------------------------------------------------------
# Optional: SmolLM2-135M-Instruct GGUF reference
# ---------------------------------------------------------------------------

SMOL_TEXT = "The quick brown fox jumps over the lazy dog."


def smollm2_reference(gguf_path):
    from transformers import AutoTokenizer

    gguf_path = os.path.abspath(gguf_path)
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tok(SMOL_TEXT)["input_ids"]
    plain = tok(SMOL_TEXT, add_special_tokens=False)["input_ids"]
    add_bos = len(ids) == len(plain) + 1 and ids[0] == tok.bos_token_id and ids[1:] == plain
    assert add_bos or ids == plain, (ids, plain)

    def score(seq):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        lp = torch.log_softmax(logits.double(), dim=-1)
        return [lp[t, seq[t + 1]].item() for t in range(len(seq) - 1)]

    logprobs = score(ids)
    gguf_meta = {}
    try:
        from gguf import GGUFReader

        r = GGUFReader(gguf_path)
        for k in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.model"):
            if k in r.fields:
                gguf_meta[k] = r.fields[k].contents()
        gguf_meta["tensor_types"] = sorted({t.tensor_type.name for t in r.tensors})
    except Exception as e:  # metadata is informative only
        gguf_meta["error"] = repr(e)
    out = {
        "text": SMOL_TEXT,
        "gguf": f,
        "add_bos": bool(add_bos),
        "bos_token_id": tok.bos_token_id,
        "ids": ids,
        "logprobs": logprobs,
        "total": float(sum(logprobs)),
        # the same text without any special token (what llama.cpp does when the GGUF says
        # tokenizer.ggml.add_bos_token = false)
        "ids_no_special": plain,
        "logprobs_no_special": (lp2 := score(plain)),
        "total_no_special": float(sum(lp2)),
        "gguf_metadata": gguf_meta,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(FIX, "smollm2_reference.json"), "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    print(f"smollm2: ids={ids} add_bos={add_bos} total={out['total']:.4f}")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", metavar="GGUF", help="also write smollm2_reference.json from this GGUF file")
    ap.add_argument("--smollm2-only", action="store_true", help="with --smollm2: skip the tiny fixtures")
    ap.add_argument(
        "--grad-cases",
        default="custom",
        help="comma-separated cases that get grad.* tensors (default custom; recorded in cases.json)",
    )
    args = ap.parse_args()
    grad_cases = [c for c in args.grad_cases.split(",") if c]

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    if not transformers.__version__.startswith("4."):
        sys.exit("use transformers 4.x (see tools/requirements-fixtures.txt)")
    os.makedirs(FIX, exist_ok=True)

    if not args.smollm2_only:
        tok = write_tokenizer(train_tokenizer())
        V = tok.get_vocab_size()
        print(f"tokenizer: vocab {V}")
        hf_tok = hf_tokenizer(tok)
        models_dir = os.path.join(FIX, "models")
        if os.path.isdir(models_dir):
            shutil.rmtree(models_dir)
        for i, (name, cfg, is_llama) in enumerate(model_configs(V)):
            save_model_dir(name, cfg, is_llama, hf_tok, seed=1000 + 10 * i, grad_cases=grad_cases)

    if args.smollm2:
        smollm2_reference(args.smollm2)


if __name__ == "__main__":
    main()
