"""The two ceilings, measured in the same run as the ops (DESIGN section 6, METHOD "two numbers").

* copy bandwidth: bytes read + bytes written by ``dst.copy_(src)`` on a large buffer, per s;
* matrix rate: FLOPs of a square GEMM (bf16 on CUDA, 8192^3; small fp32 on CPU), per s.

An op's floor is ``max(min_bytes / bandwidth, flops / rate)``; its "% of roofline" is
``100 * floor / measured median``. The minimal bytes and FLOPs of each op are in
:mod:`rlkernels._bench.cases`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import measure


@dataclass
class Roofline:
    device: str
    copy_bytes: int          # size of the copied buffer
    copy_gbps: float         # GB/s, read + write
    gemm_n: int
    gemm_dtype: str
    gemm_tflops: float

    def floor_ms(self, min_bytes: float, flops: float) -> float:
        t_bytes = min_bytes / (self.copy_gbps * 1e9)
        t_flops = flops / (self.gemm_tflops * 1e12) if flops else 0.0
        return 1e3 * max(t_bytes, t_flops)

    def pct(self, min_bytes: float, flops: float, median_ms: float) -> float:
        return 100.0 * self.floor_ms(min_bytes, flops) / median_ms


def measure_roofline(device, quick: bool = False) -> Roofline:
    device = torch.device(device)
    cuda = device.type == "cuda"
    # copy: 1 GiB each way on a GPU (far above L2), 32 MiB on CPU
    nbytes = (2**30 if cuda and not quick else 2**28 if cuda else 2**25)
    src = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    t = measure(lambda i: dst.copy_(src), 1, device=device, memory=False,
                warmup_ms=20, rep_ms=100 if cuda else 50, max_rep=200)
    copy_gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    del src, dst
    # GEMM: bf16 8192^3 on a GPU (random data, never zeros), fp32 512^3 on CPU
    n = (8192 if not quick else 4096) if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = measure(lambda i: torch.mm(a, b, out=c), 1, device=device, memory=False,
                warmup_ms=50 if cuda else 10, rep_ms=200 if cuda else 50, max_rep=200)
    tflops = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return Roofline(str(device), nbytes, copy_gbps, n, str(dtype).replace("torch.", ""), tflops)
