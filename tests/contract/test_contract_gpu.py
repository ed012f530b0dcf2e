"""GPU-only contract (``@pytest.mark.gpu``, skipped without CUDA; DESIGN section 5):

* CUDA-graph capture of the public call, forward and backward (SPEC 1: no host syncs, so
  capturable): capture once, write new input values into the captured buffers, replay,
  compare with an eager call on the new values;
* ``N * V > 2**31`` (SPEC 1: all offsets are 64-bit) for ``token_logprobs``,
  ``kl_divergence`` and ``grpo_loss``: bf16 logits of 16385 x 131072, so the last row starts
  at element 2**31; rows at both ends are checked against the fp64 torch reference run on
  those rows alone.

Every backend is listed (torch, triton, cuda); a backend that is unavailable on the GPU
machine or has no kernels for the op skips with the reason.
"""

from __future__ import annotations

import pytest
import torch
from _cases import CASES, Case, cast, implements
from _harness import SEED, run
from _naive import assert_grad_close, assert_values_close, fp32_floor

import rlkernels as rk

GPU_BACKENDS = ("torch", "triton", "cuda")
GRAPH_CASES = [c for c in CASES if c.compile]      # one small case per op


def _needs(backend: str, op: str) -> None:
    status = rk.available_backends()[backend]
    if status != "ok":
        pytest.skip(f"{backend}: {status}")
    if not implements(backend, op):
        pytest.skip(f"backend {backend!r} has no {op} kernels")


def _perturbed(case: Case, inp, seed: int):
    """Other finite values of the primary float inputs (-inf, NaN, ids, masks kept: the
    graph's shapes and the upstream gradient's zero pattern stay valid)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inp)
    for k in case.primary:
        v = inp.get(k)
        if isinstance(v, torch.Tensor):
            noise = (0.25 * torch.randn(v.shape, generator=g)).to(v)
            out[k] = torch.where(torch.isfinite(v), v + noise, v)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda c: c.id)
def test_cuda_graph_capture_replays_eager(case, backend):
    _needs(backend, case.op)
    first = cast(case, case.build(SEED), torch.float32, "cuda")
    second = _perturbed(case, first, SEED + 1)
    eager_outs, _, ups = run(case, first, backend)  # eager warm-up, and the upstream
    # on the GPU before the capture (a host-to-device copy cannot be captured)
    ups_dev = [None if u is None else u.to(device=o.device, dtype=o.dtype)
               for o, u in zip(eager_outs, ups)]
    static = dict(first)
    for k in case.diff:
        if static.get(k) is not None:
            static[k] = static[k].detach().clone().requires_grad_(True)
    names = [k for k in case.diff if static.get(k) is not None]

    def step():
        outs = case.call(static, backend)
        pairs = [(o, u) for o, u in zip(outs, ups_dev) if u is not None and o.requires_grad]
        grads = ()
        if pairs and names:
            grads = torch.autograd.grad([o for o, _ in pairs], [static[k] for k in names],
                                        [u for _, u in pairs], allow_unused=True)
        return tuple(o.detach() for o in outs), grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):                          # warm-up: caches, allocator, autotuning
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_outs, captured_grads = step()
    torch.cuda.current_stream().wait_stream(side)

    with torch.no_grad():
        for k, v in second.items():
            if isinstance(v, torch.Tensor):
                static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()

    want_outs, want_grads, _ = run(case, second, backend, ups=ups)
    what = f"{case.id} {backend}: graph replay"
    assert len(captured_outs) == len(want_outs)
    for j, (got, want) in enumerate(zip(captured_outs, want_outs)):
        # the same kernels on the same values; a tolerance of a few fp32 ulp leaves room
        # for a torch-backend kernel whose reduction order is not fixed on CUDA (the
        # determinism test checks bits)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True,
                                   msg=lambda m, j=j: f"{what}: output #{j}: {m}")
    for k, got in zip(names, captured_grads):
        want = want_grads.get(k)
        assert (got is None) == (want is None), f"{what}: d {k}"
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, equal_nan=True,
                                       msg=lambda m, k=k: f"{what}: d {k}: {m}")


# ==================================================================== N * V > 2 ** 31

BIG_N, BIG_V = 16385, 131072           # N * V = 2**31 + 2**17: the last row starts at 2**31
CHECK_ROWS = [0, 1, BIG_N - 2, BIG_N - 1]
# bytes on the GPU: bf16 [N, V] tensors (inputs and d logits) plus the fp32 work of the
# torch reference's chunks
_TENSOR = BIG_N * BIG_V * 2
NEEDS = {"token_logprobs": 3 * _TENSOR, "kl_divergence": 4 * _TENSOR,
         "grpo_loss": 3 * _TENSOR}


def _big_logits(g):
    x = torch.randn(BIG_N, BIG_V, device="cuda", dtype=torch.bfloat16, generator=g)
    # distinct rows at both ends (an offset that wraps at 2**31 would read row 0 for the
    # last row): peaked on the last column of the last row, on column 5 of row 0
    x[-1, -1] += 30.0
    x[0, 5] += 30.0
    x[-2, : BIG_V // 2] = float("-inf")
    return x


def _big_tokens(g):
    tok = torch.randint(0, BIG_V, (BIG_N,), device="cuda", generator=g)
    tok[-1] = BIG_V - 1                  # the very last element of the tensor
    tok[-2] = BIG_V - 2                  # a finite column of the half-masked row
    tok[1] = -100                        # padding
    return tok


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "kl_divergence", "grpo_loss"])
def test_more_than_2_31_elements(op, backend):
    _needs(backend, op)
    free, _ = torch.cuda.mem_get_info()
    if free < NEEDS[op] + (2 << 30):
        pytest.skip(f"needs about {NEEDS[op] / 2**30:.0f} GiB of free GPU memory, "
                    f"{free / 2**30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = _big_logits(g).requires_grad_(True)
    rows = torch.tensor(CHECK_ROWS, device="cuda")
    u = torch.randn(BIG_N, device="cuda", generator=g)
    if op == "token_logprobs":
        tok = _big_tokens(g)

        def call(logits, rows_only, b):
            t = tok[rows] if rows_only else tok
            return rk.token_logprobs(logits, t, return_entropy=True, backend=b)
    elif op == "kl_divergence":
        y = torch.randn(BIG_N, BIG_V, device="cuda", dtype=torch.bfloat16, generator=g)
        y = torch.where(torch.isinf(x.detach()), x.detach(), y)

        def call(logits, rows_only, b):
            ref = (y[rows] if rows_only else y).to(logits.dtype)
            return (rk.kl_divergence(logits, ref, kind="reverse", backend=b),)
    else:
        tok = _big_tokens(g)
        old = -torch.rand(BIG_N, device="cuda", generator=g) * 2
        mask = tok != -100

        def call(logits, rows_only, b):
            sel = (lambda t: t[rows]) if rows_only else (lambda t: t)
            # one sequence [1, N]: with a number normalizer every token's gradient is its own
            loss, _ = rk.grpo_loss(logits[None], sel(tok)[None], sel(old)[None],
                                         torch.ones(1, device="cuda"), sel(mask)[None],
                                         normalizer=1000.0, backend=b)
            return (loss,)

    outs = call(x, False, backend)
    ups = [u if o.dim() else torch.ones((), device="cuda") for o in outs]
    (grad,) = torch.autograd.grad(outs, x, ups)
    assert all(torch.isfinite(o[o != float("-inf")]).all() for o in outs)

    x_rows = x.detach()[rows].double().requires_grad_(True)
    ref_outs = call(x_rows, True, "torch")
    ref_ups = [up[rows].double() if o.dim() else up.double() for o, up in zip(outs, ups)]
    (ref_grad,) = torch.autograd.grad(ref_outs, x_rows, ref_ups)
    for j, (o, r) in enumerate(zip(outs, ref_outs)):
        if o.dim():  # per-row outputs; the loss of grpo_loss sums every row
            assert_values_close(o[rows], r, what=f"{op} {backend}: output #{j} rows {CHECK_ROWS}")
    floor = fp32_floor(x_rows.detach(), upstream=float(u.abs().max()) * len(outs))
    assert_grad_close(grad[rows], ref_grad, torch.bfloat16, floor=floor,
                      what=f"{op} {backend}: d logits rows {CHECK_ROWS}")
    del x, grad, outs
    torch.cuda.empty_cache()
