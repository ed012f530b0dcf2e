"""Steps 5 of benchmarks/gpu_check.sh: call every CUDA kernel of rlkernels._C once, for
compute-sanitizer (memcheck, racecheck, synccheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        --kernel-name kns=rlk python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --list      # the entry points, no GPU needed

Every launch entry point that csrc/bindings.cpp defines (``m.def``, less the runtime queries)
is wrapped to record its calls; the public ops then run with ``backend="cuda"`` on small, odd
shapes (V=1031, 37 rows; fp32 and bf16; padding, ``-inf`` columns, every option path that
picks another kernel), forward and backward. It prints each entry point with its call count
and exits 1 if one was never launched (a kernel the sanitizers did not see) or a call raised.
PyTorch's caching allocator must be off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``): inside one
cached block an out-of-bounds access lands in memory PyTorch owns and memcheck stays silent.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from collections import Counter
from typing import Callable, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_QUERIES = {"version", "cuda_runtime_version", "cuda_driver_version", "device_count",
                   "cuda_archs", "nvcc_version"}


def entry_points(bindings: str = os.path.join(ROOT, "csrc", "bindings.cpp")) -> List[str]:
    """The launch functions of rlkernels._C, read from the pybind11 module definition."""
    with open(bindings) as f:
        names = re.findall(r'm\.def\(\s*"([A-Za-z_0-9]+)"', f.read())
    return [n for n in dict.fromkeys(names) if n not in RUNTIME_QUERIES]


def calls(torch, rk) -> List[Tuple[str, Callable[[], None]]]:
    """(label, thunk) for every call; each thunk runs a forward and, where differentiable, a
    backward with ``backend="cuda"``."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n, v = 37, 1031

    def logits(dtype):
        x = torch.randn(n, v, generator=g, device=dev) * 2
        x[3::4, 1::3] = -math.inf
        x[1::4, 5] += 30
        return x.to(dtype)

    def tokens():
        t = torch.randint(0, v, (n,), generator=g, device=dev)
        t = torch.where((torch.arange(n, device=dev) % 4 == 3) & (t % 3 == 1), t - 1, t)
        t[::5] = -100
        return t

    def backward(*outs):
        total = sum(torch.where(torch.isfinite(o), o, 0.0).sum() for o in outs)
        total.backward()

    out: List[Tuple[str, Callable[[], None]]] = []
    for dtype in (torch.float32, torch.bfloat16):
        d = str(dtype).replace("torch.", "")

        def tl(dtype=dtype):
            x = logits(dtype).requires_grad_(True)
            backward(*rk.token_logprobs(x, tokens(), temperature=0.9, return_entropy=True,
                                        backend="cuda"))
            backward(rk.token_logprobs(x, tokens(), backend="cuda"))

        def ent(dtype=dtype):
            backward(rk.entropy(logits(dtype).requires_grad_(True), backend="cuda"))

        def kl(dtype=dtype):
            x, y = logits(dtype).requires_grad_(True), logits(dtype).requires_grad_(True)
            mask = torch.zeros(n, dtype=torch.bool, device=dev)
            mask[::4] = True
            for kind in ("reverse", "forward", "jsd"):
                backward(rk.kl_divergence(x, y, kind=kind, ignore_mask=mask, backend="cuda"))

        def sparse(dtype=dtype):
            x = logits(dtype).requires_grad_(True)
            idx = torch.randint(0, v, (n, 20), generator=g, device=dev)
            idx[::3, -1] = -1
            backward(*rk.sparse_logprobs(x, idx, return_tail=True, backend="cuda"))
            backward(rk.sparse_logprobs(x, idx, normalize="support", backend="cuda"))
            t_logp, t_idx = torch.log_softmax(torch.randn(n, v, device=dev), -1).topk(20)
            backward(rk.sparse_kl(x, t_idx, t_logp, backend="cuda"))

        def grpo(dtype=dtype):
            b, t = 1, n
            x = logits(dtype).view(b, t, v).requires_grad_(True)
            tok = tokens().view(b, t)
            old = torch.randn(b, t, generator=g, device=dev) - 5
            loss, _ = rk.grpo_loss(x, tok, old, torch.randn(b, device=dev), tok != -100,
                                   ref_logp=old - 0.1, kl_coef=0.05, entropy_coef=0.01,
                                   backend="cuda")
            loss.backward()

        out += [(f"token_logprobs {d}", tl), (f"entropy {d}", ent),
                (f"kl_divergence reverse/forward/jsd {d}", kl),
                (f"sparse_logprobs full/support + sparse_kl {d}", sparse),
                (f"grpo_loss {d}", grpo)]

    bsz, t = 5, 333

    def policy():
        logp = (torch.randn(bsz, t, generator=g, device=dev) - 2).requires_grad_(True)
        old = logp.detach() + 0.3 * torch.randn(bsz, t, generator=g, device=dev)
        mask = torch.rand(bsz, t, generator=g, device=dev) > 0.2
        ent = torch.rand(bsz, t, device=dev).requires_grad_(True)
        adv = torch.randn(bsz, device=dev)
        for kw in (dict(clip_high=0.28, dual_clip=3.0, ref_logp=old - 0.05, kl_coef=0.1,
                        entropy=ent, entropy_coef=0.01),
                   dict(agg="seq-mean-token-mean", ratio_level="sequence"),
                   dict(loss="cispo", clip_high=0.28)):
            loss, _ = rk.policy_loss(logp, old, adv, mask, backend="cuda", **kw)
            loss.backward()

    def advantages():
        r = torch.randint(0, 3, (1000,), generator=g, device=dev).float()
        for m in ("grpo", "rloo", "dr_grpo", "batch_std"):
            rk.group_advantages(r, group_size=8, method=m, backend="cuda")
        rk.group_advantages(r, group_index=torch.arange(1000, device=dev) % 37, backend="cuda")

    def scans():
        r, val = torch.randn(bsz, t, device=dev), torch.randn(bsz, t, device=dev)
        mask = torch.rand(bsz, t, generator=g, device=dev) > 0.2
        rk.gae(r, val, mask, gamma=0.99, lam=0.95, backend="cuda")
        rk.discounted_returns(r, mask, gamma=0.9, backend="cuda")
        w = val.clone().requires_grad_(True)
        rk.masked_whiten(w, mask, backend="cuda").sum().backward()

    return out + [("policy_loss ppo/gspo/cispo", policy),
                  ("group_advantages 4 methods + group_index", advantages),
                  ("gae, discounted_returns, masked_whiten", scans)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the entry points and exit")
    args = ap.parse_args(argv)
    names = entry_points()
    if args.list:
        print(f"{len(names)} launch entry points in csrc/bindings.cpp: {', '.join(names)}")
        return 0
    import torch

    import rlkernels as rk
    from rlkernels.cuda import cuda_status, load_extension

    if cuda_status() != "ok":
        print(f"NOTE: cuda backend unavailable: {cuda_status()}")
        return 2
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":
        print("warning: PYTORCH_NO_CUDA_MEMORY_CACHING=1 is not set: memcheck misses "
              "out-of-bounds accesses inside PyTorch's cached blocks")
    C = load_extension()
    count: Counter = Counter()
    for name in names:
        fn = getattr(C, name, None)
        if fn is None:
            print(f"missing in rlkernels._C: {name}")
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            count[_name] += 1
            return _fn(*a, **k)
        setattr(C, name, wrapped)
    failed = 0
    for label, thunk in calls(torch, rk):
        before = sum(count.values())
        try:
            thunk()
            torch.cuda.synchronize()
            print(f"ran  {label}: {sum(count.values()) - before} launches", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {label}:\n{traceback.format_exc()}", flush=True)
    print("entry point                      launches")
    for name in names:
        print(f"  {name:30} {count[name]}")
    missed = [n for n in names if not count[n]]
    print(f"NOTE: {len(names) - len(missed)}/{len(names)} entry points launched"
          + (f"; never launched: {', '.join(missed)}" if missed else "")
          + (f"; {failed} calls raised" if failed else ""))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
