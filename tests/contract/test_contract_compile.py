"""SPEC 1 torch integration: the public call of every op, forward and backward, traces under
``torch.compile(fullgraph=True)`` (no graph break) and gives the eager bits.

One small case per op (``Case.compile``), on every runnable backend that implements it
(torch and triton here; cuda too on a GPU). Compiling is the slow part (Inductor codegen,
seconds per graph), so there is exactly one compiled graph per (op, backend).
"""

from __future__ import annotations

import pytest
import torch
from _cases import CASES, DEVICE, cast
from _harness import SEED, params, run

COMPILE_CASES = [c for c in CASES if c.compile]


@pytest.mark.parametrize("case, backend", params(COMPILE_CASES))
def test_compile_fullgraph_matches_eager(case, backend):
    inp = cast(case, case.build(SEED), torch.float32, DEVICE)
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor)]

    def public_call(*tensors):
        return case.call(dict(zip(names, tensors)), backend)

    torch._dynamo.reset()
    compiled = torch.compile(public_call, fullgraph=True)

    def via_compiled(i, b):
        return compiled(*(i[k] for k in names))

    eager_outs, eager_grads, ups = run(case, inp, backend)
    outs, grads, _ = run(case, inp, backend, ups=ups, fn=via_compiled)
    # Not bit for bit: Inductor generates its own code for what is written in torch around
    # and behind the kernels (e.g. kl_penalty's backward formula, fused: 1 ulp apart from
    # eager). fp32 values, so rtol = atol = 1e-6 is a few ulp.
    what = f"{case.id} {backend}: compiled vs eager"
    assert len(outs) == len(eager_outs)
    for j, (a, e) in enumerate(zip(outs, eager_outs)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: output #{j}"
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, equal_nan=True,
                                   msg=lambda m, j=j: f"{what}: output #{j}: {m}")
    assert grads.keys() == eager_grads.keys()
    for k, e in eager_grads.items():
        a = grads[k]
        assert (a is None) == (e is None), f"{what}: d {k}"
        if e is not None:
            assert a.dtype == e.dtype, f"{what}: d {k}"
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, k=k: f"{what}: d {k}: {m}")
    torch._dynamo.reset()
