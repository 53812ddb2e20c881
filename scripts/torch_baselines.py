#!/usr/bin/env python3
"""PyTorch baselines, timed on the GPU machine with its own PyTorch, to put beside
`frugal-attn bench ... --json` from the same card in the same session.

  python3 scripts/torch_baselines.py copy
  python3 scripts/torch_baselines.py decode --batch 16 --q-heads 32 --kv-heads 8 --seq 16384 --head-dim 128 --dtype f16
  python3 scripts/torch_baselines.py topk --rows 64 --n 131072 --k 8192
  python3 scripts/torch_baselines.py sparq --batch 16 --q-heads 32 --kv-heads 8 --seq 65536 --r 16 --k 4096
  python3 scripts/torch_baselines.py blockwise --batch 1 --q-heads 32 --kv-heads 32 --seq 8192 --head-dim 128 --dtype bf16

Each prints one JSON object per line: technique, backend, device, case, seconds,
bytes, gbps (the same keys `frugal-attn bench --json` writes); blockwise adds
flops and tflops (forward and backward, full and causal).
"""
import argparse
import json
import math

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


def emit(technique, backend, case, secs, nbytes):
    print(json.dumps({"technique": technique, "backend": backend, "device": torch.cuda.get_device_name(),
                      "case": case, "seconds": secs, "bytes": nbytes, "gbps": nbytes / secs / 1e9}), flush=True)


def copy(a):
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    emit("copy", "torch", {"bytes": n}, time_cuda(lambda: dst.copy_(src), a.iters), 2 * n)


def decode_inputs(a):
    dt = DTYPES[a.dtype]
    q = torch.randn(a.batch, a.q_heads, 1, a.head_dim, device="cuda", dtype=dt)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device="cuda", dtype=dt)
    return q, k, torch.randn_like(k)


def decode_case(a):
    return {"batch": a.batch, "q_heads": a.q_heads, "kv_heads": a.kv_heads, "seq": a.seq,
            "head_dim": a.head_dim, "dtype": a.dtype}


def decode(a):
    q, k, v = decode_inputs(a)
    secs = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), a.iters)
    emit("decode", "torch-sdpa", decode_case(a), secs, (k.numel() + v.numel() + 2 * q.numel()) * k.element_size())


def topk(a):
    x = torch.randn(a.rows, a.n, device="cuda", dtype=DTYPES[a.dtype])
    secs = time_cuda(lambda: torch.topk(x, a.k, dim=-1, largest=True, sorted=False), a.iters)
    nbytes = x.numel() * x.element_size() + a.rows * a.k * (8 + x.element_size())
    emit("topk", "torch.topk", {"rows": a.rows, "n": a.n, "k": a.k, "dtype": a.dtype}, secs, nbytes)


def sparq(a):
    """SparQ the way the paper's reference code does it: gathers and torch.topk (shared GQA mode)."""
    q, k, v = decode_inputs(a)
    kt = k.transpose(-1, -2).contiguous()  # [B, Hkv, D, S]
    v_mean = v.float().mean(dim=2, keepdim=True)
    g = a.q_heads // a.kv_heads
    d = a.head_dim
    l = a.k // 4

    def step():
        qg = q.view(a.batch, a.kv_heads, g, d)
        i1 = qg.abs().sum(dim=2).topk(a.r, dim=-1).indices  # [B, Hkv, r]
        qr = torch.gather(qg, 3, i1.unsqueeze(2).expand(-1, -1, g, -1))
        kr = torch.gather(kt, 2, i1.unsqueeze(-1).expand(-1, -1, -1, a.seq))  # [B, Hkv, r, S]
        tau = torch.sqrt(d * qr.abs().sum(-1, keepdim=True) / qg.abs().sum(-1, keepdim=True))
        s_hat = torch.softmax((qr @ kr).float() / tau, dim=-1)  # [B, Hkv, g, S]
        key = s_hat.sum(dim=2)
        key[..., a.seq - l:] = float("inf")
        i2 = key.topk(a.k, dim=-1).indices  # [B, Hkv, k]
        alpha = torch.gather(s_hat, 3, i2.unsqueeze(2).expand(-1, -1, g, -1)).sum(-1, keepdim=True)
        idx = i2.unsqueeze(-1).expand(-1, -1, -1, d)
        kk, vv = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
        att = torch.softmax((qg @ kk.transpose(-1, -2)).float() / math.sqrt(d), dim=-1)
        y = att.to(vv.dtype) @ vv
        return alpha * y.float() + (1 - alpha) * v_mean

    secs = time_cuda(step, a.iters)
    per = a.seq * a.r + 2 * a.k * d + 4 * d
    nbytes = a.batch * a.kv_heads * per * k.element_size()
    case = dict(decode_case(a), r=a.r, k=a.k)
    emit("sparq", "torch-gather", case, secs, nbytes)


def blockwise(a):
    """SDPA forward and forward+backward minus forward, Sq = Sk = --seq, FLOPs as frugal-attn counts them."""
    dt = DTYPES[a.dtype]
    q = torch.randn(a.batch, a.q_heads, a.seq, a.head_dim, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(a.batch, a.kv_heads, a.seq, a.head_dim, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    d_o = torch.randn_like(q)
    nbytes = (2 * q.numel() + k.numel() + v.numel()) * q.element_size()
    for causal in (False, True):
        flops = 4.0 * a.batch * a.q_heads * a.seq * a.seq * a.head_dim / (2 if causal else 1)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=a.q_heads != a.kv_heads)
        with torch.no_grad():
            fwd = time_cuda(sdpa, a.iters)
        both = time_cuda(lambda: sdpa().backward(d_o), a.iters)
        for what, secs, f in (("forward", fwd, flops), ("backward", max(both - fwd, 1e-9), 2.5 * flops)):
            case = dict(decode_case(a), causal=causal, **{"pass": what})
            print(json.dumps({"technique": "blockwise", "backend": "torch-sdpa", "device": torch.cuda.get_device_name(),
                              "case": case, "seconds": secs, "bytes": nbytes, "gbps": nbytes / secs / 1e9,
                              "flops": f, "tflops": f / secs / 1e12}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["copy", "decode", "topk", "sparq", "blockwise"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="f16", choices=DTYPES)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    {"copy": copy, "decode": decode, "topk": topk, "sparq": sparq, "blockwise": blockwise}[a.what](a)


if __name__ == "__main__":
    main()
