"""onnxruntime reference for qcc's agreement tests and CPU benchmark.

  ort_reference.py logits --model M.onnx --ids ids.npy --out-dir DIR [--threads N]
      ids.npy holds int64 [windows, ctx]. Writes DIR/nll.npy (float64 [windows]: summed negative
      log-likelihood of tokens 2..ctx of each window) and DIR/logits0.npy (float32 [ctx, vocab], window 0).
  ort_reference.py bench --model M.onnx --ctx 512 --threads N --repeat R
      Prints one JSON line: {"seconds_per_window": best of R runs, ...}.
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def session(model, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def cmd_logits(a):
    ids = np.load(a.ids)
    s = session(a.model, a.threads)
    nll = []
    for w, window in enumerate(ids):
        logits = s.run(["logits"], {"input_ids": window[None, :].astype(np.int64)})[0][0]
        lp = log_softmax(logits[:-1])
        nll.append(-lp[np.arange(len(window) - 1), window[1:]].sum())
        if w == 0:
            np.save(f"{a.out_dir}/logits0.npy", logits.astype(np.float32))
    np.save(f"{a.out_dir}/nll.npy", np.array(nll, dtype=np.float64))


def cmd_bench(a):
    s = session(a.model, a.threads)
    ids = (np.arange(a.ctx, dtype=np.int64) * 7919 % 49152)[None, :]
    s.run(["logits"], {"input_ids": ids})  # warm-up
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        s.run(["logits"], {"input_ids": ids})
        times.append(time.perf_counter() - t)
    print(json.dumps({"engine": "onnxruntime " + ort.__version__, "threads": a.threads,
                      "ctx": a.ctx, "seconds_per_window": min(times), "runs": times}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("logits")
    l.add_argument("--model", required=True)
    l.add_argument("--ids", required=True)
    l.add_argument("--out-dir", required=True)
    l.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--ctx", type=int, default=512)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    {"logits": cmd_logits, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    main()
