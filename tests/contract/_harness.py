"""Running a :class:`_cases.Case` through the public op: outputs, gradients, comparisons.

Gradients are taken with a random upstream gradient per differentiable output (seeded, the
values rounded to fp32 so the fp64 reference sees exactly the same numbers), zero where the
output is not finite (a -inf log-prob has no gradient to give).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from _cases import CASES, DEVICE, RUNNABLE_BACKENDS, Case, Inputs, implements
from _naive import bit_equal, grad_tolerance

Tensor = torch.Tensor
SEED = 1234
Outs = List[Tensor]
Grads = Dict[str, Optional[Tensor]]
Ups = List[Optional[Tensor]]


def upstreams(outs: Sequence[Tensor], seed: int = SEED) -> Ups:
    """One random upstream gradient per output that requires grad (else None)."""
    g = torch.Generator().manual_seed(seed)
    ups: Ups = []
    for o in outs:
        if not o.requires_grad:
            ups.append(None)
            continue
        u = torch.randn(o.shape, generator=g, dtype=torch.float64).float().double()
        u = torch.where(torch.isfinite(o.detach().cpu()), u, torch.zeros_like(u))
        ups.append(u)
    return ups


def run(case: Case, inp: Inputs, backend: str, ups: Optional[Ups] = None, *,
        fn=None, clone: bool = True) -> Tuple[Outs, Grads, Ups]:
    """Call the case's public op on ``inp`` (outputs and gradients detached, on the device
    of the inputs). ``clone=False`` keeps the differentiable inputs' strides exactly (a
    non-contiguous view stays one: ``clone`` would make it contiguous)."""
    leaves = dict(inp)
    for k in case.diff:
        v = inp.get(k)
        if v is not None:
            v = v.detach()
            leaves[k] = (v.clone() if clone else v).requires_grad_(True)
    outs = (fn or case.call)(leaves, backend)
    assert isinstance(outs, tuple) and all(isinstance(o, Tensor) for o in outs), type(outs)
    if ups is None:
        ups = upstreams(outs)
    assert len(ups) == len(outs)
    grads: Grads = {}
    pairs = [(o, u) for o, u in zip(outs, ups) if u is not None and o.requires_grad]
    names = [k for k in case.diff if leaves.get(k) is not None]
    if pairs and names:
        got = torch.autograd.grad([o for o, _ in pairs],
                                  [leaves[k] for k in names],
                                  [u.to(device=o.device, dtype=o.dtype) for o, u in pairs],
                                  allow_unused=True)
        grads = dict(zip(names, got))
    return [o.detach() for o in outs], grads, ups


def assert_bitwise(a_outs: Outs, a_grads: Grads, b_outs: Outs, b_grads: Grads, what: str,
                   out_idx=None, grad_names=None) -> None:
    """Outputs (all, or those in ``out_idx``) and gradients bit-identical."""
    assert len(a_outs) == len(b_outs), what
    for j, (a, b) in enumerate(zip(a_outs, b_outs)):
        if out_idx is not None and j not in out_idx:
            continue
        assert bit_equal(a.cpu(), b.cpu()), f"{what}: output #{j} differs\n{a}\n{b}"
    names = a_grads.keys() if grad_names is None else grad_names
    for k in names:
        assert bit_equal(_cpu(a_grads.get(k)), _cpu(b_grads.get(k))), \
            f"{what}: gradient of {k} differs\n{a_grads.get(k)}\n{b_grads.get(k)}"


def _cpu(x):
    return None if x is None else x.cpu()


def grad_close(g: Tensor, g_ref: Tensor, dtype: torch.dtype, *, floor: float,
               eps_mult: float, what: str) -> None:
    """SPEC 5: ``|g - g_ref| <= eps_mult / 2 * (2 eps(dtype) max|g_ref|) + 1e-7 + floor``."""
    assert g.dtype == dtype, f"{what}: gradient dtype {g.dtype}, expected {dtype}"
    assert g.shape == g_ref.shape, what
    g64, r64 = g.double().cpu(), g_ref.double().cpu()
    assert torch.isfinite(r64).all(), f"{what}: non-finite reference gradient"
    assert torch.isfinite(g64).all(), f"{what}: non-finite gradient"
    m = float(r64.abs().max()) if r64.numel() else 0.0
    tol = grad_tolerance(r64, dtype, floor) + (eps_mult - 2.0) * torch.finfo(dtype).eps * m
    err = float((g64 - r64).abs().max()) if g64.numel() else 0.0
    assert err <= tol, f"{what}: max |g - g_ref| = {err:.3e} > tolerance {tol:.3e} ({dtype})"


def params(cases=None, backends=None, *, per_dtype: bool = False, marks=()):
    """pytest params ``(case, backend)`` (or ``(case, dtype, backend)``) for every case and
    every runnable backend that implements the case's op: pairs a backend does not implement
    are not collected at all (nothing to skip)."""
    out = []
    for case in (CASES if cases is None else cases):
        for b in (RUNNABLE_BACKENDS if backends is None else backends):
            if not implements(b, case.op):
                continue
            if case.big and b == "triton" and DEVICE == "cpu":
                continue  # the interpreter: N * V stays at a few hundred (GPU covers it)
            if per_dtype:
                for dt in case.dtypes:
                    dname = str(dt).replace("torch.", "")
                    out.append(pytest.param(case, dt, b, id=f"{case.id}-{dname}-{b}",
                                            marks=marks))
            else:
                out.append(pytest.param(case, b, id=f"{case.id}-{b}", marks=marks))
    return out
