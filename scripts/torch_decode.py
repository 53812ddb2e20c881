#!/usr/bin/env python3
"""Side-by-side baseline for dense decode on a GPU machine (its own PyTorch).

Times, on the same card and in the same run:
  - the device-to-device copy bandwidth (the ceiling for a memory-bound kernel),
  - torch.nn.functional.scaled_dot_product_attention on one decode step
    (one query token per sequence, GQA through enable_gqa),
and prints one JSON object per line, in the shape `frugal-attn bench --json` uses,
so the two can be joined by case.

  python3 scripts/torch_decode.py --batch 16 --q-heads 32 --kv-heads 8 --seq 16384 --head-dim 128 --dtype f16
"""
import argparse
import json

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def time_cuda(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / iters


def copy_bandwidth(nbytes, iters):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    secs = time_cuda(lambda: dst.copy_(src), iters)
    return 2 * nbytes / secs  # read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="f16", choices=DTYPES)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    dt = DTYPES[a.dtype]
    dev = torch.cuda.get_device_name()

    bw = copy_bandwidth(1 << 30, a.iters)
    print(json.dumps({"technique": "copy", "backend": "torch", "device": dev, "bytes": 2 << 30,
                      "gbps": bw / 1e9}))

    q = torch.randn(a.batch, a.q_heads, 1, a.head_dim, device="cuda", dtype=dt)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    secs = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), a.iters)
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * k.element_size()
    case = {"batch": a.batch, "q_heads": a.q_heads, "kv_heads": a.kv_heads, "seq": a.seq,
            "head_dim": a.head_dim, "dtype": a.dtype}
    print(json.dumps({"technique": "decode", "backend": "torch-sdpa", "device": dev, "case": case,
                      "seconds": secs, "bytes": nbytes, "gbps": nbytes / secs / 1e9,
                      "fraction_of_copy": nbytes / secs / bw}))


if __name__ == "__main__":
    main()
