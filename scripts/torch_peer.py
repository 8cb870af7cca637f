#!/usr/bin/env python3
"""PyTorch fp16 eager peer of the Llama-2-7B-shaped end-to-end timings (issue 7's second peer).

Runs on the GPU machine, whose /opt/torch/.venv python has torch with CUDA (nothing here installs it;
scripts/gpu_check.sh calls this only where `import torch` works). The model is Llama-2-7B's shape with
seeded random fp16 weights drawn on the GPU (hidden 4096, ffn 11008, 32 heads of 128, vocab 32000,
untied LM head; --layers cuts it), written in plain PyTorch as Hugging Face's LlamaForCausalLM computes
it in eager mode: RMSNorm in f32, rotary embedding, scaled_dot_product_attention, SwiGLU MLP, logits of
the last position only (as `generate` asks for). The KV cache is preallocated per layer
([batch, heads, max_tokens, head_dim], a static cache: the peer gets no torch.cat per step).

Timings (CUDA events, after warm-up, median of --repeat runs):
  prefill: one forward of --prefill tokens at batch 1, cache written;
  decode:  one step (one new token per sequence) after --past cached positions, at each --batch,
           eager (one Python dispatch per op, as PyTorch eager runs) and, with --cuda-graph, replayed
           from a captured CUDA graph (the launch overhead removed, the same kernels).
Prints one line per measurement and writes them as JSON (--json FILE).

  python3 scripts/torch_peer.py --layers 32 --past 512 --batch 1 16 --prefill 2048 --json out.json
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HIDDEN, FFN, HEADS, HEAD_DIM, VOCAB, EPS, THETA = 4096, 11008, 32, 128, 32000, 1e-5, 10000.0


class Llama(torch.nn.Module):
    def __init__(self, layers, max_tokens, max_batch, seed, device):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        dt = torch.float16

        def linear(n_in, n_out):  # [out, in], as nn.Linear stores it
            return (torch.randn(n_out, n_in, generator=g, device=device, dtype=torch.float32)
                    / math.sqrt(n_in)).to(dt)

        def norm(n):
            return (0.9 + 0.2 * torch.rand(n, generator=g, device=device)).to(dt)

        self.embed = torch.randn(VOCAB, HIDDEN, generator=g, device=device, dtype=torch.float32).to(dt)
        self.layers = []
        for _ in range(layers):
            self.layers.append(dict(
                ln1=norm(HIDDEN), q=linear(HIDDEN, HIDDEN), k=linear(HIDDEN, HIDDEN),
                v=linear(HIDDEN, HIDDEN), o=linear(HIDDEN, HIDDEN), ln2=norm(HIDDEN),
                gate=linear(HIDDEN, FFN), up=linear(HIDDEN, FFN), down=linear(FFN, HIDDEN)))
        self.norm = norm(HIDDEN)
        self.lm_head = linear(HIDDEN, VOCAB)
        inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, device=device, dtype=torch.float32) / HEAD_DIM))
        freqs = torch.outer(torch.arange(max_tokens, device=device, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(dt), emb.sin().to(dt)
        shape = (max_batch, HEADS, max_tokens, HEAD_DIM)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dt) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dt) for _ in range(layers)]

    @staticmethod
    def rms_norm(x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
        return w * xf.to(x.dtype)

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, ids, start):
        """ids [B, S] at positions start..start+S; returns the last position's logits [B, VOCAB]."""
        b, s = ids.shape
        x = F.embedding(ids, self.embed)
        cos = self.cos[start:start + s][None, None]
        sin = self.sin[start:start + s][None, None]
        end = start + s
        for i, p in enumerate(self.layers):
            h = self.rms_norm(x, p["ln1"])
            q = F.linear(h, p["q"]).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            k = F.linear(h, p["k"]).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            v = F.linear(h, p["v"]).view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            self.k_cache[i][:b, :, start:end] = k
            self.v_cache[i][:b, :, start:end] = v
            keys, values = self.k_cache[i][:b, :, :end], self.v_cache[i][:b, :, :end]
            a = F.scaled_dot_product_attention(q, keys, values, is_causal=s > 1 and start == 0)
            x = x + F.linear(a.transpose(1, 2).reshape(b, s, HIDDEN), p["o"])
            h = self.rms_norm(x, p["ln2"])
            x = x + F.linear(F.silu(F.linear(h, p["gate"])) * F.linear(h, p["up"]), p["down"])
        x = self.rms_norm(x[:, -1:], self.norm)
        return F.linear(x, self.lm_head)[:, 0]


def time_ms(fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--past", type=int, default=512, help="cached positions before a timed decode step")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens (0: no prefill timing)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-graph", action="store_true", help="also time decode replayed from a CUDA graph")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_peer: no CUDA device")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    max_tokens = max(args.prefill, args.past + 1)
    t0 = time.time()
    model = Llama(args.layers, max_tokens, max(args.batch), args.seed, dev)
    torch.cuda.synchronize()
    name = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {name}, {args.layers} layers, weights drawn in {time.time() - t0:.1f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    results = dict(device=name, torch=torch.__version__, layers=args.layers, past=args.past, runs=[])

    def report(kind, batch, tokens, median, best):
        rate = batch * tokens / (median / 1e3)
        print(f"{kind:<22} batch {batch:>2} tokens {tokens:>5}: {median:9.4f} ms median ({best:.4f} best), "
              f"{rate:10.1f} tokens/s", flush=True)
        results["runs"].append(dict(kind=kind, batch=batch, tokens=tokens, ms_median=median, ms_best=best,
                                    tokens_per_s=rate))

    with torch.inference_mode():
        if args.prefill:
            ids = torch.randint(0, VOCAB, (1, args.prefill), generator=gen, device=dev)
            report("prefill eager", 1, args.prefill, *time_ms(lambda: model(ids, 0), max(3, args.repeat // 4)))
        for b in args.batch:
            past = torch.randint(0, VOCAB, (b, args.past), generator=gen, device=dev)
            model(past, 0)  # fills the caches' first `past` positions
            new = torch.randint(0, VOCAB, (b, 1), generator=gen, device=dev)
            report("decode eager", b, 1, *time_ms(lambda: model(new, args.past), args.repeat))
            if args.cuda_graph:
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        model(new, args.past)
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    model(new, args.past)
                report("decode cuda-graph", b, 1, *time_ms(graph.replay, args.repeat))
                del graph
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
