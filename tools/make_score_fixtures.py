#!/usr/bin/env python3
"""Reference fixtures for `rrhf score` (tests/it/score.rs), from transformers and vaderSentiment.

Writes (overwriting) under tests/fixtures/score/:
  models/<name>/   tiny random reward models, weights stored in float16 (values exactly representable, the
                   references are computed in float32 from the same values):
                     llama_rm    LlamaForSequenceClassification   (num_labels 1, pad 3)
                     gpt2_rm     GPT2ForSequenceClassification    (num_labels 1, pad = eos = 2, text + eos)
                     neox_rm     GPTNeoXForSequenceClassification (num_labels 1, pad 3)
                     gptj_rm     GPT-J body + bias-free v_head, the Dahoas/gptj-rm-static layout: `model.safetensors`
                                 (GPTJModel weights under `transformer.` + `v_head.weight`) and `gptj_rm.pt`, a torch
                                 pickle of the same state dict (plus the old `attn.bias` / `attn.masked_bias` buffers,
                                 as checkpoints of that time carry them)
                     bert_cls    BertForSequenceClassification       (3 labels: negative, neutral, positive)
                     distilbert_cls DistilBertForSequenceClassification (id2label {0: NEGATIVE, 1: POSITIVE})
                   Decoder models reuse tests/fixtures/tokenizer.json; the classifiers share a tiny WordPiece tokenizer.
  rewards.json     per model: how its text is built, the records, the ids transformers' tokenizer gives each
                   (query, response) and the reward transformers computes (each text alone; the script asserts a
                   right-padded batch gives the same within 1e-5).
  vader.json       VADER compound scores of sentences from vaderSentiment 3.3.2 (`compound` unrounded, as rrhf
                   reports it, and `compound_rounded`, the 4-decimal value polarity_scores returns).
And the VADER lexicon data embedded in the crate, derived from the installed vaderSentiment 3.3.2:
  src/score/vader_data/vader_lexicon.tsv   `word\\tmean` (the two columns vaderSentiment reads, in file order)
  src/score/vader_data/emoji_utf8_lexicon.tsv  single-character emoji → description (vaderSentiment looks emoji up
                                           one character at a time, so longer keys can never match)
  src/score/vader_data/LICENSE.txt         vaderSentiment's MIT licence

Run: tools/.venv/bin/pip install vaderSentiment==3.3.2 && tools/.venv/bin/python tools/make_score_fixtures.py
Deterministic (fixed seeds, one thread).
"""

import json
import os
import shutil

import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPTJConfig,
    GPTJModel,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "score")
VADER_OUT = os.path.join(ROOT, "src", "score", "vader_data")
BOS, EOS, PAD = 1, 2, 3
MAX_POS = 64

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

# (query, responses) records; HH-style dialogue prompts for the decoder reward models.
LONG_QUERY = "".join(
    f"\n\nHuman: {q}\n\nAssistant: {a}"
    for q, a in [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Can you tell me a joke?", "Why did the chicken cross the road? To get to the other side."),
        ("How do I boil an egg?", "Put the egg in boiling water for about eight minutes."),
    ]
) + "\n\nHuman: Who wrote Hamlet?\n\nAssistant:"
DECODER_RECORDS = [
    {
        "query": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "responses": [" The capital of France is Paris.", " I do not know.", ""],
        "sources": ["policy:beam", "dataset:chosen", "dataset:rejected"],
    },
    {
        "query": "\n\nHuman: Can you tell me a joke?\n\nAssistant:",
        "responses": [" Why did the chicken cross the road? To get to the other side.", " No."],
        "sources": ["policy:beam", "dataset:chosen"],
    },
    {
        # Longer than 64 tokens: left-truncated.
        "query": LONG_QUERY,
        "responses": [" Hamlet was written by William Shakespeare.", " The cat sat on the mat."],
        "sources": ["policy:beam", "dataset:chosen"],
    },
]
CLASSIFIER_RECORDS = [
    {"query": "The movie was", "responses": [" really great and fun to watch!", " boring, too long and badly acted."]},
    {"query": "I think this film", "responses": [" is the best I have seen this year.", ""]},
    {
        # Longer than 64 tokens with the response: right-truncated (the classifiers keep the start).
        "query": "This review is about a long film. " * 8,
        "responses": [" In the end I loved it.", " Terrible."],
    },
]

VADER_SENTENCES = [
    "VADER is smart, handsome, and funny.",
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "VADER is not smart, handsome, nor funny.",
    "The book was only kind of good.",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "Today only kinda sux! But I'll get by, lol",
    "Make sure you :) or :D today!",
    "Catch utf-8 emoji such as 💘 and 💋 and 😁",
    "Not bad at all",
    "I love my heart and all my hearts",
    "Roger Dodger is at least compelling as a variation on the theme.",
    "Roger Dodger is one of the least compelling variations on this theme.",
    "Without a doubt, excellent idea.",
    "He was not very happy.",
    "no problem at all, happy to help",
    "It wasn't very good at all; in fact it was pretty awful...",
    "Wow!!! That was AMAZING and so much fun???",
    "This film is the bomb, a real kick in the pants.",
    "yeah right, like that's going to work",
    "Sentiment analysis has never been this good!",
    "",
    "the the the",
]


def round_to_half(model):
    """Makes every parameter exactly representable in float16 and perturbs 1-D ones so biases and norms matter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def hf_tokenizer(path, **specials):
    return PreTrainedTokenizerFast(tokenizer_file=path, **specials)


def decoder_tokenizer():
    return hf_tokenizer(
        os.path.join(FIX, "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def train_wordpiece():
    """A tiny WordPiece tokenizer with a vocabulary built deterministically (the `tokenizers` WordPiece trainer orders
    equal-count entries differently from run to run): specials, every character alone and as `##c`, and the words
    that occur at least twice."""
    corpus = [rec["query"] + r for rec in CLASSIFIER_RECORDS for r in rec["responses"]]
    corpus += [
        "the movie was great and i loved it",
        "the film was terrible and boring",
        "a wonderful story with good actors",
        "i did not like this film at all",
        "best movie of the year, really fun",
        "badly written, too long, the worst",
    ] * 3
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = {}
    for line in corpus:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for w in counts for c in w})
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab_list += sorted(w for w, n in counts.items() if n >= 2 and len(w) > 1)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def save_model(model, name, tok, extra_files=()):
    d = os.path.join(OUT, "models", name)
    os.makedirs(d, exist_ok=True)
    model.half().save_pretrained(d, safe_serialization=True)
    model.float()
    tok.save_pretrained(d)
    for f in extra_files:
        shutil.copy(f, d)
    return d


def text_of(spec, query, response):
    text = (query + spec["separator"] + response) if spec["score_on"] == "full" else response
    if spec["append_eos"]:
        text += spec["eos_text"]
    return text


def encode(tok, spec, text):
    side = spec["truncation_side"]
    tok.truncation_side = side
    return tok(text, truncation=True, max_length=spec["max_len"])["input_ids"]


def check_batch(fn, ids_list, pad_id, want):
    """A right-padded batch with an attention mask gives what each text gives alone."""
    T = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), T), dtype=torch.long)
    for i, x in enumerate(ids_list):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    got = fn(ids, mask)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), (got, want)


def seq_class_rewards(model, tok, spec, records, label_index=None):
    model.eval()
    out = []
    all_ids = []
    for rec in records:
        row = {"query": rec["query"], "responses": rec["responses"], "ids": [], "rewards": []}
        if "sources" in rec:
            row["sources"] = rec["sources"]
        for r in rec["responses"]:
            ids = encode(tok, spec, text_of(spec, rec["query"], r))
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            reward = logits[0].item() if label_index is None else torch.softmax(logits, -1)[label_index].item()
            row["ids"].append(ids)
            row["rewards"].append(reward)
            all_ids.append(ids)
        out.append(row)

    def batch_fn(ids, mask):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        return logits[:, 0] if label_index is None else torch.softmax(logits, -1)[:, label_index]

    flat = [x for row in out for x in row["rewards"]]
    check_batch(batch_fn, all_ids, model.config.pad_token_id if model.config.pad_token_id is not None else 0, flat)
    return out


class GptjRewardModel(torch.nn.Module):
    """The Dahoas/gptj-rm-static module as trlx loads it: GPT-J body, `v_head`, reward at the first EOS."""

    def __init__(self, config, eos_id):
        super().__init__()
        self.transformer = GPTJModel(config)
        self.v_head = torch.nn.Linear(config.n_embd, 1, bias=False)
        self.eos_id = eos_id

    def forward(self, input_ids, attention_mask=None):
        states = self.transformer(input_ids, attention_mask=attention_mask)[0]
        rewards = self.v_head(states).squeeze(-1)
        ends = torch.argmax((input_ids == self.eos_id).float(), dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends).squeeze(-1)


def gptj_fixture(tok):
    cfg = GPTJConfig(
        vocab_size=320, n_positions=MAX_POS, n_embd=16, n_layer=2, n_head=4, rotary_dim=2, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    cfg.architectures = ["GPTJForCausalLM"]
    torch.manual_seed(4)
    m = GptjRewardModel(cfg, EOS)
    with torch.no_grad():
        m.v_head.weight.normal_(0.0, 0.5)
    round_to_half(m)
    m.eval()
    spec = dict(kind="gptj_rm", separator=" ", append_eos=True, eos_text="</s>", score_on="full",
                truncation_side="left", max_len=MAX_POS)
    out, all_ids = [], []
    for rec in DECODER_RECORDS:
        row = {"query": rec["query"], "responses": rec["responses"], "sources": rec["sources"], "ids": [], "rewards": []}
        for r in rec["responses"]:
            ids = encode(tok, spec, text_of(spec, rec["query"], r))
            assert ids[-1] == EOS
            with torch.no_grad():
                reward = m(torch.tensor([ids])).item()
            row["ids"].append(ids)
            row["rewards"].append(reward)
            all_ids.append(ids)
        out.append(row)

    # trlx pads with EOS and passes no attention mask: the first EOS is the real end, causality does the rest.
    def batch_fn(ids, mask):
        ids = ids.masked_fill(mask == 0, EOS)
        with torch.no_grad():
            return m(ids)

    check_batch(batch_fn, all_ids, EOS, [x for row in out for x in row["rewards"]])

    d = os.path.join(OUT, "models", "gptj_rm")
    os.makedirs(d, exist_ok=True)
    sd = {k: v.detach().clone().half().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    old = dict(sd)
    for i in range(cfg.n_layer):
        old[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(MAX_POS, MAX_POS, dtype=torch.bool)).view(
            1, 1, MAX_POS, MAX_POS
        )
        old[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(old, os.path.join(d, "gptj_rm.pt"))
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
    return spec, out


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(os.path.join(OUT, "models"))
    tok = decoder_tokenizer()
    common = dict(vocab_size=320, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2)
    rewards = {}

    # --- decoder sequence classifiers ------------------------------------------------------------------------
    dec_spec = dict(separator="", append_eos=False, eos_text="</s>", score_on="full", truncation_side="left",
                    max_len=MAX_POS)
    torch.manual_seed(1)
    llama = LlamaForSequenceClassification(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0,
                    num_labels=1, pad_token_id=PAD, attn_implementation="eager", **common)
    )
    round_to_half(llama)
    spec = dict(dec_spec, kind="llama_rm")
    rewards["llama_rm"] = dict(spec, records=seq_class_rewards(llama, tok, spec, DECODER_RECORDS))
    save_model(llama, "llama_rm", tok)

    torch.manual_seed(2)
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=MAX_POS, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, num_labels=1, pad_token_id=EOS, attn_implementation="eager", **common)
    )
    round_to_half(gpt2)
    # pad = eos and the text ends with eos: the score is read at the last token before it (transformers' rule).
    spec = dict(dec_spec, kind="gpt2_rm", append_eos=True)
    rewards["gpt2_rm"] = dict(spec, records=seq_class_rewards(gpt2, tok, spec, DECODER_RECORDS))
    save_model(gpt2, "gpt2_rm", tok)

    torch.manual_seed(3)
    neox = GPTNeoXForSequenceClassification(
        GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True, max_position_embeddings=MAX_POS,
                      hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False, num_labels=1,
                      pad_token_id=PAD, attn_implementation="eager", **common)
    )
    round_to_half(neox)
    spec = dict(dec_spec, kind="neox_rm")
    rewards["neox_rm"] = dict(spec, records=seq_class_rewards(neox, tok, spec, DECODER_RECORDS))
    save_model(neox, "neox_rm", tok)

    spec, recs = gptj_fixture(tok)
    rewards["gptj_rm"] = dict(spec, records=recs)

    # --- encoder classifiers ---------------------------------------------------------------------------------
    wp = train_wordpiece()
    wp_path = os.path.join(OUT, "wordpiece.json")
    wp.save(wp_path)
    wtok = hf_tokenizer(wp_path, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                        mask_token="[MASK]")
    os.remove(wp_path)
    V = wp.get_vocab_size()
    cls_spec = dict(separator="", append_eos=False, eos_text="", score_on="full", truncation_side="right",
                    max_len=MAX_POS)
    torch.manual_seed(5)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                   max_position_embeddings=MAX_POS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   initializer_range=0.3, pad_token_id=0, num_labels=3,
                   id2label={0: "negative", 1: "neutral", 2: "positive"},
                   label2id={"negative": 0, "neutral": 1, "positive": 2}, attn_implementation="eager")
    )
    round_to_half(bert)
    spec = dict(cls_spec, kind="bert_cls", label="positive")
    rewards["bert_cls"] = dict(spec, records=seq_class_rewards(bert, wtok, spec, CLASSIFIER_RECORDS, label_index=2))
    save_model(bert, "bert_cls", wtok)

    torch.manual_seed(6)
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=4, hidden_dim=32, max_position_embeddings=MAX_POS,
                         dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, initializer_range=0.3,
                         pad_token_id=0, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                         label2id={"NEGATIVE": 0, "POSITIVE": 1}, attn_implementation="eager")
    )
    round_to_half(distil)
    spec = dict(cls_spec, kind="distilbert_cls", label="POSITIVE")
    rewards["distilbert_cls"] = dict(
        spec, records=seq_class_rewards(distil, wtok, spec, CLASSIFIER_RECORDS, label_index=1)
    )
    save_model(distil, "distilbert_cls", wtok)

    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "tokenizers": tokenizers.__version__}
    with open(os.path.join(OUT, "rewards.json"), "w", encoding="utf-8") as f:
        json.dump(dict(meta, models=rewards), f, ensure_ascii=False, indent=1)
        f.write("\n")

    write_vader()
    write_readme(meta)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"tests/fixtures/score: {total / 1024:.0f} KiB")


def write_readme(meta):
    text = f"""# `rrhf score` fixtures (generated — do not edit by hand)

Made by `tools/make_score_fixtures.py` with transformers {meta["transformers"]}, torch {meta["torch"]}, tokenizers
{meta["tokenizers"]} and vaderSentiment 3.3.2 on CPU (float32, eager attention); deterministic. Regenerate:

    tools/.venv/bin/pip install -r tools/requirements-fixtures.txt vaderSentiment==3.3.2
    tools/.venv/bin/python tools/make_score_fixtures.py

- `models/`: tiny random reward models, weights stored in float16 (exactly representable; the references are computed
  in float32 from the same values): `llama_rm`, `gpt2_rm` (pad = eos, text + eos), `neox_rm` (`*ForSequenceClassification`,
  one output), `gptj_rm` (GPT-J + bias-free `v_head`, the Dahoas/gptj-rm-static layout, as `model.safetensors` and as the
  pickle `gptj_rm.pt` with old-style `attn.bias` / `attn.masked_bias` buffers), `bert_cls` (3 labels) and
  `distilbert_cls` (NEGATIVE / POSITIVE) with a tiny WordPiece tokenizer. Decoders use `../tokenizer.json`.
- `rewards.json`: per model, the text layout (`separator`, `append_eos`, `score_on`, `truncation_side`, `max_len`,
  `label`), the records (queries longer than 64 tokens are truncated), the ids transformers' tokenizer gives each text
  and the reward transformers computes (one text at a time; a right-padded batch is asserted equal within 1e-5).
- `vader.json`: VADER compound scores from vaderSentiment 3.3.2 (`compound` unrounded, `compound_rounded` as
  `polarity_scores` returns it).

The script also writes `src/score/vader_data/` (the embedded VADER lexicon and its MIT licence).
"""
    with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def write_vader():
    import vaderSentiment
    import vaderSentiment.vaderSentiment as vs

    assert vaderSentiment.__file__ and vs.__name__
    from importlib.metadata import version

    assert version("vaderSentiment") == "3.3.2", version("vaderSentiment")
    an = vs.SentimentIntensityAnalyzer()
    rounded = [an.polarity_scores(s)["compound"] for s in VADER_SENTENCES]
    vs.round = lambda x, n=None: x  # the module's own `round` (module globals shadow builtins): unrounded values
    exact = [an.polarity_scores(s)["compound"] for s in VADER_SENTENCES]
    del vs.round
    cases = [{"text": s, "compound": e, "compound_rounded": r} for s, e, r in zip(VADER_SENTENCES, exact, rounded)]
    with open(os.path.join(OUT, "vader.json"), "w", encoding="utf-8") as f:
        json.dump({"vaderSentiment": "3.3.2", "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")

    os.makedirs(VADER_OUT, exist_ok=True)
    pkg = os.path.dirname(vs.__file__)
    # The two columns make_lex_dict reads, in file order (a later duplicate wins there as in a dict).
    with open(os.path.join(VADER_OUT, "vader_lexicon.tsv"), "w", encoding="utf-8", newline="\n") as f:
        for line in an.lexicon_full_filepath.rstrip("\n").split("\n"):
            if not line:
                continue
            word, measure = line.strip().split("\t")[0:2]
            f.write(f"{word}\t{measure}\n")
    with open(os.path.join(VADER_OUT, "emoji_utf8_lexicon.tsv"), "w", encoding="utf-8", newline="\n") as f:
        for line in an.emoji_full_filepath.rstrip("\n").split("\n"):
            emoji, desc = line.strip().split("\t")[0:2]
            if len(emoji) == 1:
                f.write(f"{emoji}\t{desc}\n")
    lic = os.path.join(os.path.dirname(pkg), "vaderSentiment-3.3.2.dist-info", "LICENSE.txt")
    shutil.copy(lic, os.path.join(VADER_OUT, "LICENSE.txt"))
    # The derived files give back the analyzer's dictionaries exactly.
    lex = {}
    for line in open(os.path.join(VADER_OUT, "vader_lexicon.tsv"), encoding="utf-8"):
        w, m = line.rstrip("\n").split("\t")
        lex[w] = float(m)
    assert lex == an.lexicon
    emo = {}
    for line in open(os.path.join(VADER_OUT, "emoji_utf8_lexicon.tsv"), encoding="utf-8"):
        e, d = line.rstrip("\n").split("\t")
        emo[e] = d
    assert emo == {k: v for k, v in an.emojis.items() if len(k) == 1}


if __name__ == "__main__":
    main()
