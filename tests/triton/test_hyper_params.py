"""Float hyper-parameters are runtime arguments of the vocabulary, sparse and lm_head kernels.

The convention of the triton backend (rlkernels/triton/_common.py): a float reaches a kernel
as fp32 scalars, a ``(hi, lo)`` pair from :func:`rlkernels.triton._common.split` where fp64
kernels need more than fp32; ``tl.constexpr`` holds only flags, modes and block sizes. So two
calls that differ only in a float (``temperature``, ``beta``, ``logit_scale``, ``softcap``)
launch the same compiled kernels, and a new temperature never triggers a compile.

The interpreter compiles nothing, so this captures the launches of the real launchers on
GPU-like meta tensors (``benchmarks/sm90_compile.py``'s capture, in a subprocess without
``TRITON_INTERPRET``), the approach of the recompile test in test_policy_kernels.py. Nothing is
compiled: the check compares what Triton's JIT would key its cache on (signature, constexprs,
specialization attributes, options).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import sm90_compile as S
from rlkernels.triton import linear as LI, sparse as SP, vocab as VO

# small shapes: nothing runs, only the launchers' argument binding matters; V spans several
# blocks (full and partial) so that every loop shape of the kernels is bound
N, V, K, H = 64, 5000, 16, 256


def token_logprobs(t):
    x, tok = S.gpu(N, V, dtype=torch.bfloat16), S.gpu(N, dtype=torch.int64)
    for tokens, ent in ((tok, False), (tok, True), (None, True)):
        lp, h, st = VO.token_logprobs_forward(x, tokens, t, -100, ent)
        VO.token_logprobs_backward(lp if tokens is not None else None, h if ent else None, x,
                                   tokens, st, t, -100)


def kl(t, beta):
    x, y = S.gpu(N, V, dtype=torch.bfloat16), S.gpu(N, V, dtype=torch.bfloat16)
    for kind in ("reverse", "forward", "jsd"):
        out, sp, sq = VO.kl_divergence_forward(x, y, None, kind, beta, t)
        VO.kl_divergence_partial_forward(x, y, None, sp, sq, kind, beta, t)
        VO.kl_divergence_backward(out, x, y, None, sp, sq, kind, beta, t, True)


def sparse(t):
    x = S.gpu(N, V, dtype=torch.bfloat16)
    idx, tgt = S.gpu(N, K, dtype=torch.int64), S.gpu(N, K, dtype=torch.float32)
    for tail in (False, True):
        for norm in ("full", "support"):
            lp, tl_, st = SP.sparse_logprobs_forward(x, idx, t, norm, tail)
            SP.sparse_logprobs_backward(lp, tl_ if tail else None, x, idx, lp, tl_, st, t, norm)
        k, s_tail, st = SP.sparse_kl_forward(x, idx, tgt, t, tail)
        SP.sparse_kl_backward(k, x, idx, tgt, s_tail, st, t, tail)


def linear(t, path="triton"):
    h, w = S.gpu(N, H, dtype=torch.bfloat16), S.gpu(V, H, dtype=torch.bfloat16)
    tok = S.gpu(N, dtype=torch.int64)
    lp, e, st = LI.linear_token_logprobs_forward(h, w, None, tok, t, -100, True, None, path)
    LI.linear_token_logprobs_backward(lp, e, h, w, None, tok, st, t, -100, None, path)


def linear_map(t, scale, cap):
    h, w = S.gpu(N, H, dtype=torch.bfloat16), S.gpu(V, H, dtype=torch.bfloat16)
    tok = S.gpu(N, dtype=torch.int64)
    lp, e, st, _ = LI.linear_token_stats_forward(h, w, None, tok, t, -100, True, scale, cap,
                                                 True)
    LI.linear_token_logprobs_backward(lp, e, h, w, None, tok, st, t, -100, path="triton",
                                      logit_scale=scale, softcap=cap)


CASES = {
    # temperature 1 gives (hi, lo) = (1.0, 0.0): still runtime values, not specialized
    "token_logprobs temperature": [lambda t=t: token_logprobs(t) for t in (0.7, 0.9, 1.0)],
    "kl_divergence temperature": [lambda t=t: kl(t, 0.5) for t in (0.7, 0.9, 1.0)],
    # beta 0 and 1 make log(beta) / log(1 - beta) -inf: runtime values too
    "kl_divergence beta": [lambda b=b: kl(0.7, b) for b in (0.5, 0.1, 0.0, 1.0)],
    "sparse temperature": [lambda t=t: sparse(t) for t in (0.7, 0.9, 1.0)],
    "linear_token_logprobs temperature": [lambda t=t: linear(t) for t in (0.7, 0.9, 1.0)],
    "linear_token_logprobs cublas temperature": [lambda t=t: linear(t, "cublas")
                                                 for t in (0.7, 1.0)],
    "linear logit_scale / softcap": [lambda a=a: linear_map(*a)
                                     for a in ((0.7, 2.0, 30.0), (0.9, 0.5, 50.0))],
}

for name, calls in CASES.items():
    variants = []
    for call in calls:
        found, errors = S.capture_launches([(name, call)], 90)
        assert not errors, (name, errors)
        assert found, name
        for launch in found.values():
            floats = [v for v in launch.constexprs.values() if isinstance(v, float)]
            assert not floats, (name, launch.kernel, floats)
            # the convention: fp32 scalars (a hi / lo pair for fp64 kernels), no fp64 scalar
            assert "fp64" not in launch.signature.values(), (name, launch.kernel,
                                                             launch.signature)
        variants.append(set(found))
    assert all(v == variants[0] for v in variants), (name, [len(v) for v in variants])
    print(name, len(variants[0]), "same")
print("all same")
"""


def test_float_hyper_parameters_compile_nothing_new(tmp_path):
    """``token_logprobs`` (temperature), ``kl_divergence`` (temperature, beta; every kind,
    the partial forward, backward), the four sparse launchers (temperature, with and without
    the tail) and ``linear_token_logprobs`` (temperature on both paths; ``logit_scale`` and
    ``softcap`` of the private TRL head) launch the same compiled kernel variants whatever the
    float values: no float is a constexpr, every scalar float is fp32."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all same" in proc.stdout, proc.stdout[-3000:]
