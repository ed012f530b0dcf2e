"""The fused lm_head's head precision, padding-row skipping and cuBLAS path
(``rlkernels.triton.linear``; issue 20).

Reference: :mod:`rlkernels.reference.linear` in fp64 on the same values. Outputs within
``atol = rtol = 1e-5`` (1e-12 for fp64); gradients within ``(2 + H) eps max|g_ref| + 1e-7``
with ``eps`` of the coarsest GEMM operand (bf16 when ``d z`` or the inputs are bf16: the
backward GEMMs then see ``d z`` rounded to bf16), the bound ``test_linear_kernels.py`` uses
for GEMM-derived logits.

On CPU ``torch.mm`` stands in for cuBLAS and the Triton kernels run in the interpreter. The
cuBLAS path's chunk sizes are forced small so that the tiny shapes still have several row
chunks (the last one padded), several vocabulary slices (the last one narrower) and, with a
small ``dz_bytes``, several row groups (the fp32 ``d weight`` accumulator):

* N = 37 rows, chunks of 16 (3 chunks, the last with 5 rows), H = 40, V = 300, slices of
  64 columns (5 slices, the last with 44); padding rows (one holding NaN hidden, never read).
"""

import pytest
import torch

import rlkernels

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

from rlkernels.reference import linear as ref  # noqa: E402
from rlkernels.triton import linear as tk  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
N, DIM, V = 37, 40, 300
CUBLAS = dict(path="cublas", chunk_rows=16)
CUBLAS_BWD = dict(CUBLAS, slice_cols=64)


def make(n=N, h=DIM, v=V, *, seed=0, dtype=torch.float32):
    """fp64 tensors holding values exactly representable in ``dtype``; rows 1 and n-2 are
    padding, row 1's hidden is NaN; a bias ramp moves row maxima across slices."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) / h ** 0.5 * 2.0
    bias = 0.5 * torch.randn(v, generator=g, dtype=F64) + torch.linspace(-3, 3, v, dtype=F64)
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[0] = v - 1
    tokens[2] = 0
    tokens[1] = -100
    tokens[n - 2] = -100
    hidden, weight, bias = (x.to(dtype).double() for x in (hidden, weight, bias))
    hidden[1] = float("nan")
    return hidden, weight, bias, tokens


def upstream(n=N, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def fwd(h, w, b, tok, dtype, t=0.7, **kw):
    return tk.linear_token_logprobs_forward(h.to(DEV, dtype), w.to(DEV, dtype),
                                            None if b is None else b.to(DEV, dtype),
                                            tok.to(DEV), t, -100, True, **kw)


def bwd(g_lp, g_h, h, w, b, tok, stats, dtype, t=0.7, **kw):
    cdt = F64 if dtype == F64 else torch.float32
    return tk.linear_token_logprobs_backward(
        g_lp.to(DEV, cdt), None if g_h is None else g_h.to(DEV, cdt), h.to(DEV, dtype),
        w.to(DEV, dtype), None if b is None else b.to(DEV, dtype), tok.to(DEV), stats, t, -100,
        **kw)


def live_rows(tok):
    return tok != -100


def close_outputs(out, out_ref, tok, dtype):
    tol = 1e-12 if dtype == F64 else 1e-5
    live = live_rows(tok)
    for x, r in zip(out[:2], out_ref[:2]):
        torch.testing.assert_close(x.cpu().double(), r.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(out[2].cpu().double()[live], out_ref[2].double()[live],
                               atol=tol, rtol=tol)


def grad_bound(g, g_ref, eps_dtype):
    eps = torch.finfo(eps_dtype).eps
    tol = (2 + DIM) * eps * g_ref.abs().max().item() + 1e-7
    err = (g.cpu().double() - g_ref.double()).abs().max().item()
    assert err <= tol, f"gradient error {err:.3e} > {tol:.3e} ({g.dtype}, eps of {eps_dtype})"


def reference(h, w, b, tok, g_lp, g_h, t=0.7, round_to=None, dz_round=None):
    """fp64 reference on the inputs rounded to ``round_to`` (the head precision's operands),
    with ``d z`` rounded as ``dz_round`` (a head precision name or None)."""
    if round_to is not None:
        h, w = (x.to(round_to).double() for x in (h, w))
    h = torch.where(live_rows(tok)[:, None], h, 0.0)  # the padding row's NaN is never read
    out = ref.linear_token_logprobs_forward(h, w, b, tok, t, -100, True)
    grads = ref.linear_token_logprobs_backward(g_lp, g_h, h, w, b, tok, out[2], t, -100,
                                               dz_round)
    return out, grads


# ========================================================================== head_precision

PRECISION_CASES = [
    # (input dtype, head_precision, the GEMM operands' rounding, eps of the gradient bound)
    (torch.float32, None, None, torch.float32),
    (torch.float32, "fp32", None, torch.float32),
    (torch.float32, "tf32", None, torch.float32),  # CPU: tf32 is computed as fp32
    (torch.float32, "bf16", torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, "fp32", None, torch.bfloat16),
    (torch.bfloat16, "bf16", None, torch.bfloat16),
    (F64, "bf16", torch.bfloat16, torch.bfloat16),
    (F64, "fp32", torch.float32, torch.float32),
]


@pytest.mark.parametrize("path", ["triton", "cublas"])
@pytest.mark.parametrize("dtype,prec,round_to,eps_dtype", PRECISION_CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_head_precision_matches_fp64_reference(path, dtype, prec, round_to, eps_dtype):
    """Every head precision equals the fp64 reference on operands rounded to it (outputs
    1e-5), on both paths; the gradients within the bound of the coarsest operand."""
    h, w, b, tok = make(dtype=dtype)
    g_lp, g_h = upstream()
    kw = dict(CUBLAS) if path == "cublas" else dict(path="triton")
    out = fwd(h, w, b, tok, dtype, head_precision=prec, **kw)
    out_ref, grads_ref = reference(h, w, b, tok, g_lp, g_h, round_to=round_to, dz_round=prec)
    tol_dtype = F64 if (dtype == F64 and prec is None) else torch.float32
    close_outputs(out, out_ref, tok, tol_dtype)
    if path == "cublas":
        kw["slice_cols"] = 64
    grads = bwd(g_lp, g_h, h, w, b, tok, out[2], dtype, head_precision=prec, **kw)
    for g, r in zip(grads, grads_ref):
        assert g.dtype == dtype
        grad_bound(g, r, eps_dtype)


def test_bf16_head_rounds_fp32_inputs():
    """``"bf16"`` on fp32 inputs is not the fp32 head: its log-probs are off the unrounded
    fp64 reference by far more than 1e-5 (so the rounding of the test above happened), and
    the reference's own ``head_precision="bf16"`` rounds as the test's explicit rounding."""
    h, w, b, tok = make()
    g_lp, g_h = upstream()
    out = fwd(h, w, b, tok, torch.float32, head_precision="bf16", path="triton")
    exact, _ = reference(h, w, b, tok, g_lp, g_h)
    live = live_rows(tok)
    assert (out[0].double()[live] - exact[0][live]).abs().max() > 1e-3
    hz = torch.where(live[:, None], h, 0.0)
    by_ref = ref.linear_token_logprobs_forward(hz, w, b, tok, 0.7, -100, True, "bf16")
    rounded, _ = reference(h, w, b, tok, g_lp, g_h, round_to=torch.bfloat16)
    for x, y in zip(by_ref, rounded):
        assert torch.equal(x, y)


def test_tf32_is_fp32_on_cpu():
    if HAS_CUDA:
        pytest.skip("on a GPU tf32 rounds the operands to 10 mantissa bits")
    h, w, b, tok = make()
    g_lp, g_h = upstream()
    for path in ("triton", "cublas"):
        kw = dict(CUBLAS_BWD) if path == "cublas" else dict(path="triton")
        fkw = {k: v for k, v in kw.items() if k != "slice_cols"}
        a = fwd(h, w, b, tok, torch.float32, head_precision="tf32", **fkw)
        c = fwd(h, w, b, tok, torch.float32, head_precision="fp32", **fkw)
        ga = bwd(g_lp, g_h, h, w, b, tok, a[2], torch.float32, head_precision="tf32", **kw)
        gc = bwd(g_lp, g_h, h, w, b, tok, c[2], torch.float32, head_precision="fp32", **kw)
        for x, y in zip(a + ga, c + gc):
            assert torch.equal(x, y)


def test_fp32_head_keeps_dz_in_fp32():
    """bf16 inputs: ``d z`` goes to the backward GEMMs in bf16 by default and in fp32 with
    ``head_precision="fp32"`` (the rest of the fp32 head is exact for bf16 operands)."""
    assert tk._head_precision(torch.bfloat16, None).dz_dtype == torch.bfloat16
    assert tk._head_precision(torch.bfloat16, "fp32").dz_dtype == torch.float32
    assert tk._head_precision(torch.bfloat16, "tf32").dz_dtype == torch.float32
    assert tk._head_precision(torch.float32, "bf16") == tk._Prec(1, "ieee", torch.bfloat16)
    assert tk._head_precision(torch.float32, "tf32").fwd_dot == "tf32"
    assert tk._head_precision(torch.bfloat16, "tf32").fwd_dot == "ieee"  # exact products


# ================================================================== padding rows: no dots

@pytest.fixture
def dot_counter(monkeypatch):
    """Counts the interpreter's ``tl.dot`` calls (each is one tile's GEMM step)."""
    if HAS_CUDA:
        pytest.skip("counts the interpreter's dots")
    from triton.runtime import interpreter
    calls = {"n": 0}
    original = interpreter.InterpreterBuilder.create_dot

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    return calls


def test_padding_row_blocks_run_no_dot(dot_counter):
    """32 rows, blocks of 16: with rows 0-15 all padding, the forward, ``_dz_kernel`` and the
    ``d hidden`` GEMM run half the dots of the same call without padding (the ``d weight``
    GEMM's K loop still visits every row block), and the padding rows' results stay 0."""
    n = 32
    h, w, b, tok = make(n, seed=2)
    h[1] = 0.5  # row 1 is live in the count without padding
    g_lp, g_h = upstream(n, 2)
    blocks = (16, 64, 16)

    def count(tokens):
        dot_counter["n"] = 0
        out = fwd(h, w, b, tokens, torch.float32, path="triton", blocks=blocks)
        n_fwd = dot_counter["n"]
        dot_counter["n"] = 0
        grads = bwd(g_lp, g_h, h, w, b, tokens, out[2], torch.float32, path="triton",
                    blocks=blocks)
        return n_fwd, dot_counter["n"], out, grads

    full = tok.clone()
    full[full == -100] = 3
    half = full.clone()
    half[:16] = -100
    f_full, b_full, _, _ = count(full)
    f_half, b_half, out, grads = count(half)
    assert f_half * 2 == f_full
    # backward: dz (4 H chunks x 5 tiles per row block) + d hidden (300 / 16 K steps x 3 H
    # column blocks per row block) halve; d weight (2 K steps x 19 x 3 tiles) does not
    dz_per_block = 5 * 3
    dh_per_block = 19 * 3
    dw = 19 * 3 * 2
    assert b_full == 2 * (dz_per_block + dh_per_block) + dw
    assert b_half == (dz_per_block + dh_per_block) + dw
    assert all((x[:16] == 0).all() for x in out)
    assert (grads[0][:16] == 0).all()


# ========================================================================= the cuBLAS path

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", ["one", "several"])
def test_cublas_path_matches_reference(dtype, with_bias, groups):
    """3 row chunks (last padded), 5 vocabulary slices (last narrower); ``several``: ``d z``
    in one-chunk row groups, ``d weight`` through its fp32 accumulator."""
    h, w, b, tok = make(dtype=dtype, seed=1)
    b = b if with_bias else None
    g_lp, g_h = upstream(seed=1)
    out = fwd(h, w, b, tok, dtype, **CUBLAS)
    out_ref, grads_ref = reference(h, w, b, tok, g_lp, g_h)
    close_outputs(out, out_ref, tok, dtype)
    assert all((x[~live_rows(tok)] == 0).all() for x in out)
    kw = dict(CUBLAS_BWD)
    if groups == "several":
        kw["dz_bytes"] = 16 * 64 * 4
    grads = bwd(g_lp, g_h, h, w, b, tok, out[2], dtype, **kw)
    eps = torch.bfloat16 if dtype == torch.bfloat16 else dtype
    assert (grads[2] is None) == (b is None)
    for g, r in zip(grads[:2] if b is None else grads, grads_ref):
        assert g.dtype == dtype
        assert not g.isnan().any()  # the NaN hidden row is never read
        grad_bound(g, r, eps)
    assert (grads[0][~live_rows(tok)] == 0).all()


def test_cublas_path_one_upstream_gradient():
    h, w, b, tok = make(seed=6)
    g_lp, _ = upstream(seed=6)
    out = fwd(h, w, b, tok, torch.float32, **CUBLAS)
    _, grads_ref = reference(h, w, b, tok, g_lp, None)
    grads = bwd(g_lp, None, h, w, b, tok, out[2], torch.float32, **CUBLAS_BWD)
    for g, r in zip(grads, grads_ref):
        grad_bound(g, r, torch.float32)


def test_cublas_path_deterministic():
    h, w, b, tok = make(seed=4)
    g_lp, g_h = upstream(seed=4)
    runs = []
    for _ in range(2):
        out = fwd(h, w, b, tok, torch.float32, **CUBLAS)
        runs.append(out + bwd(g_lp, g_h, h, w, b, tok, out[2], torch.float32, **CUBLAS_BWD))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_path_batch_invariant(dtype):
    """A row alone, or inside a batch of 37 at any position of any chunk, gets the same bits:
    log-prob, entropy, statistics and its ``d hidden`` row (every GEMM call has M = 16)."""
    h, w, b, tok = make(seed=5, dtype=dtype)
    g_lp, g_h = upstream(seed=5)
    batch = fwd(h, w, b, tok, dtype, **CUBLAS)
    g_batch = bwd(g_lp, g_h, h, w, b, tok, batch[2], dtype, **CUBLAS_BWD)
    for i in (0, 3, 17, N - 1):
        sl = slice(i, i + 1)
        alone = fwd(h[sl], w, b, tok[sl], dtype, **CUBLAS)
        for x, y in zip(batch, alone):
            assert torch.equal(x[sl], y)
        g_alone = bwd(g_lp[sl], g_h[sl], h[sl], w, b, tok[sl], alone[2], dtype, **CUBLAS_BWD)
        assert torch.equal(g_batch[0][sl], g_alone[0])
    # the same rows shifted by 5 positions (other chunk boundaries, other neighbours)
    shifted = fwd(h[5:], w, b, tok[5:], dtype, **CUBLAS)
    for x, y in zip(batch, shifted):
        assert torch.equal(x[5:], y)


def test_cublas_rows_selection():
    """``rows=``: only the given rows are computed (others: the 0 of padding rows, and no
    gradient); the selected rows' outputs and ``d hidden`` rows are the bits of the full
    call (batch invariance), ``d weight`` that of the full call with the other rows'
    upstream gradients zero."""
    h, w, b, tok = make(seed=7)
    g_lp, g_h = upstream(seed=7)
    rows = torch.tensor([0, 2, 3, 20, 21, 36], device=DEV)
    full = fwd(h, w, b, tok, torch.float32, **CUBLAS)
    sel = fwd(h, w, b, tok, torch.float32, rows=rows, **CUBLAS)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[rows.cpu()] = True
    for x, y in zip(full, sel):
        assert torch.equal(x[mask], y[mask])
        assert (y[~mask] == 0).all()
    g_full = bwd(g_lp * mask, g_h * mask, h, w, b, tok, full[2], torch.float32, **CUBLAS_BWD)
    g_sel = bwd(g_lp, g_h, h, w, b, tok, sel[2], torch.float32, rows=rows, **CUBLAS_BWD)
    assert torch.equal(g_sel[0][mask], g_full[0][mask])
    assert (g_sel[0][~mask] == 0).all()
    for x, y in zip(g_sel[1:], g_full[1:]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_rows_errors():
    h, w, b, tok = make()
    with pytest.raises(ValueError, match=r"rows: expected a 1-d int64 tensor"):
        fwd(h, w, b, tok, torch.float32, rows=torch.tensor([0, 1], dtype=torch.int32),
            **CUBLAS)
    with pytest.raises(ValueError, match=r"rows: expected a 1-d int64 tensor"):
        fwd(h, w, b, tok, torch.float32, rows=torch.tensor([[0, 1]]), path="triton")


def test_triton_path_rows_selection():
    """The triton path takes ``rows=`` too (issue 20): the selected rows' outputs are those
    of the full call, the others are padding."""
    h, w, b, tok = make(seed=8)
    rows = torch.tensor([1, 4, 30], device=DEV)
    full = fwd(h, w, b, tok, torch.float32, path="triton")
    sel = fwd(h, w, b, tok, torch.float32, rows=rows, path="triton")
    mask = torch.zeros(N, dtype=torch.bool)
    mask[rows.cpu()] = True
    for x, y in zip(full, sel):
        torch.testing.assert_close(x[mask], y[mask], atol=1e-6, rtol=1e-6)
        assert (y[~mask] == 0).all()


def test_auto_path():
    """``auto``: cuBLAS on CUDA tensors (until a GPU measures the paths), triton elsewhere."""
    assert tk._resolve_path("auto", torch.empty(1)) == "triton"
    if HAS_CUDA:
        assert tk._resolve_path("auto", torch.empty(1, device="cuda")) == "cublas"
    assert tk._chunk_rows(151936, None) == 768  # 768 x 151936 fp32 logits = 445 MiB
    assert tk._chunk_rows(7, None) % tk._CHUNK_ALIGN == 0
    # a small vocabulary: capped (V = 37 used to pad every call to 3.6M rows and ask the
    # backward for a 237 GB buffer)
    assert tk._chunk_rows(37, None) == tk._MAX_CHUNK
