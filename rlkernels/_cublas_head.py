"""The cuBLAS path of the fused lm_head ops (issue 20), backend-neutral: the chunk loops with
the GEMMs through ``torch.mm`` (cuBLAS on a GPU, ``_C`` stays CUDA-runtime-only), and the
vocabulary work on each chunk of logits done by kernels the caller passes in (the cuda
backend's, rlkernels/cuda/linear.py; the triton backend's can be passed the same way).

With ``y = hidden @ weight^T + bias`` (fp32; fp64 for fp64 inputs) and ``z = y / T``:

* :func:`token_forward`: per chunk of ``C`` rows (:func:`chunk_rows`; the last chunk
  zero-padded to ``C``, so every GEMM call has the same shape ``[C, H] x [H, V]`` whatever N
  and cuBLAS picks the same algorithm: batch invariant by construction), the logits chunk
  ``y_c``, then ``vocab_forward(y_c, tokens_c, T, ignore_index, with_entropy) -> (logp,
  entropy, stats [C, 3])`` (a backend's ``token_logprobs_forward``).
* :func:`token_backward`: per vocabulary slice of ``S`` columns, per chunk: ``y`` of the
  slice, ``dz_kernel`` (a "d z of a slice" callable, see :func:`token_backward`) writes ``d
  z = (g_lp (onehot - p) - g_H p ((z - m) - sum p (z - m))) / T`` from the saved row
  statistics, then ``d hidden_c += d z_c W_s`` and ``d W_s = d z^T h`` by ``torch.mm``.
* :func:`sparse_forward` / :func:`sparse_backward`: ``linear_sparse_logprobs`` with a
  backend's ``sparse_logprobs_forward`` / ``_backward`` on each chunk (padded ``[N, K]`` ids
  or a CSR support: ``offsets`` pass through to the kernels, which read absolute positions).

``head_precision`` (:func:`precision`): the GEMMs' operand precision, ``None`` (the
inputs' own), ``"bf16"``, ``"tf32"`` or ``"fp32"``; accumulation fp32 (fp64 for fp64) always.
Padding rows (``tokens == ignore_index``) of ``hidden`` are zeroed before the GEMMs (NaN there
is harmless) and get exact zeros everywhere. No host sync, no atomics.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

# the forward holds one fp32 [C, V] logits chunk of at most this many bytes; C is a multiple
# of CHUNK_ALIGN rows (a function of V only: batch invariance)
LOGITS_BYTES = 1 << 29
CHUNK_ALIGN = 128
MAX_CHUNK = 4096
# the backward forms d z in vocabulary slices of this many columns ...
SLICE_COLS = 8192
# ... and materializes d z of at most this many bytes (a group of whole chunks)
DZ_BYTES = 1 << 28

HEAD_PRECISIONS = ("bf16", "tf32", "fp32")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs compute in fp64, every other float dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Prec(NamedTuple):
    """How a head precision reaches the GEMMs: ``round`` (operands rounded to bf16: 1, to
    fp32: 2, kept: 0), the triton forward dot's ``input_precision`` (``fwd_dot``; unused by
    cuBLAS, which takes TF32 from :func:`tf32`), and the dtype ``d z`` is stored in for the
    backward GEMMs."""
    round: int
    fwd_dot: str
    dz_dtype: torch.dtype


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """``d z``'s dtype for the backward GEMMs with no head precision: bf16 for bf16 inputs
    (both GEMMs on bf16 tensor cores, fp32 accumulation; the rounding autograd applies to
    materialized bf16 logits, relative ``2**-9`` per element, inside SPEC 5's bf16 gradient
    bound), else the compute dtype. fp16 is NOT rounded to fp16: ``d z`` of ~1e-9 (a loss
    normalized over many tokens times a flat row's probabilities) would flush to zero and a
    large upstream gradient overflow."""
    return torch.bfloat16 if dtype == torch.bfloat16 else compute_dtype(dtype)


def precision(dtype: torch.dtype, head_precision: Optional[str]) -> Prec:
    """``None``: the inputs' own precision. ``"bf16"``: every GEMM operand (``hidden``,
    ``weight``, ``d z``) rounded to bf16. ``"tf32"``: fp32 operands on TF32 tensor cores (on
    CPU: fp32). ``"fp32"``: fp32 operands (exact for bf16 / fp16 inputs) and ``d z`` in
    fp32. ValueError naming ``head_precision`` for anything else."""
    if head_precision is None:
        return Prec(0, "ieee", dz_dtype(dtype))
    if head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision: expected None or one of {HEAD_PRECISIONS}, got "
                         f"{head_precision!r}")
    if head_precision == "bf16":
        return Prec(0 if dtype == torch.bfloat16 else 1, "ieee", torch.bfloat16)
    fwd_dot = "tf32" if head_precision == "tf32" and dtype == torch.float32 else "ieee"
    return Prec(2 if dtype == torch.float64 else 0, fwd_dot, torch.float32)


def chunk_rows(vocab: int, rows: Optional[int] = None) -> int:
    """Rows per GEMM call: ``rows`` (tests) or the most ``CHUNK_ALIGN``-multiple whose fp32
    logits fit ``LOGITS_BYTES``, at most ``MAX_CHUNK``; never a function of N, so every
    logits / ``d hidden`` GEMM has the same M whatever the batch."""
    if rows is not None:
        return int(rows)
    c = LOGITS_BYTES // (4 * vocab) // CHUNK_ALIGN * CHUNK_ALIGN
    return min(MAX_CHUNK, max(CHUNK_ALIGN, c))


@contextlib.contextmanager
def tf32(enabled: bool, device: torch.device):
    """cuBLAS fp32 GEMMs on TF32 tensor cores inside the block (``head_precision="tf32"``);
    restores the process setting. No-op off CUDA (CPU GEMMs are fp32)."""
    if not enabled or device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    old = flags.allow_tf32
    flags.allow_tf32 = True
    try:
        yield
    finally:
        flags.allow_tf32 = old


def mm(a: Tensor, b: Tensor, cdt: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` with exact products and ``cdt`` accumulation and result: bf16 / fp16 operands
    go to cuBLAS as they are with an fp32 output (``out_dtype``); on CPU, and for mixed
    dtypes, both operands are converted to ``cdt`` first (exact)."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        if out is None:
            return torch.mm(a, b, out_dtype=cdt)
        return torch.mm(a, b, out_dtype=cdt, out=out)
    a, b = a.to(cdt), b.to(cdt)
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def round_operand(x: Tensor, prec: Prec) -> Tensor:
    """A GEMM operand rounded as the head precision says (``round`` of :class:`Prec`)."""
    if prec.round == 1:
        return x.to(torch.bfloat16)
    if prec.round == 2:
        return x.to(torch.float32)
    return x


def _device(t: Tensor):
    """Launch on ``t``'s GPU (the kernels launch on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ============================================================================ token log-probs

def token_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                  temperature: float, ignore_index: int, with_entropy: bool,
                  head_precision: Optional[str], rows: Optional[int], *,
                  vocab_forward: Callable) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N], entropy [N], stats [N, 3])`` (compute dtype): per chunk of ``C = rows``
    rows (:func:`chunk_rows`), ``y = h_c W^T (+ b)`` (every call ``[C, H] x [H, V]``, the
    last chunk zero-padded), then ``vocab_forward(y[:cnt], tokens_c, temperature,
    ignore_index, with_entropy)``. Extra memory: ``y [C, V]`` (<= 512 MiB), ``[C, H]``; with
    a rounding head precision a rounded copy of ``W``."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    prec = precision(hidden.dtype, head_precision)
    logp = hidden.new_empty(n, dtype=cdt)
    ent = hidden.new_empty(n, dtype=cdt)
    stats = hidden.new_empty(n, 3, dtype=cdt)
    if n == 0:
        return logp, ent, stats
    c = chunk_rows(vocab, rows)
    w_t = round_operand(weight, prec).t()
    live = (tokens != ignore_index)[:, None]
    hbuf = torch.zeros((c, dim), dtype=w_t.dtype, device=hidden.device)
    y = torch.empty((c, vocab), dtype=cdt, device=hidden.device)
    b = None if bias is None else bias.to(cdt)
    with tf32(head_precision == "tf32", hidden.device):
        for r0 in range(0, n, c):
            cnt = min(c, n - r0)
            hbuf[:cnt] = torch.where(live[r0:r0 + cnt], hidden[r0:r0 + cnt], 0)
            if cnt < c:
                hbuf[cnt:] = 0
            mm(hbuf, w_t, cdt, out=y)
            if b is not None:
                y += b
            out = vocab_forward(y[:cnt], tokens[r0:r0 + cnt], temperature, ignore_index,
                                with_entropy)
            logp[r0:r0 + cnt] = out[0]
            ent[r0:r0 + cnt] = out[1]
            stats[r0:r0 + cnt] = out[2]
    return logp, ent, stats


def token_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                   hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                   stats: Tensor, temperature: float, ignore_index: int,
                   head_precision: Optional[str], rows: Optional[int],
                   slice_cols: Optional[int], dz_bytes: int, *, dz_kernel: Callable,
                   dz_block_rows: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)`` in the inputs' dtypes, three GEMMs through
    ``torch.mm`` per slice.

    Per vocabulary slice ``s`` of ``S`` columns (``slice_cols`` or ``SLICE_COLS``), per
    group of ``G`` rows (the most whole chunks whose ``d z [G, S]`` fits ``dz_bytes``), per
    chunk of ``C`` rows (zero-padded to ``C``): ``y = h_c W_s^T (+ b_s)``, then
    ``dz_kernel(y, glp, gh, tok, stats, dz, dbp, n_live, v0, temperature, ignore_index)``
    writes ``d z`` of the chunk's rows ``< n_live`` into ``dz`` (a ``[C, cnt]`` view of the
    group's buffer, in the head precision's dtype; rows ``>= n_live`` are already 0) from
    ``y`` (``[C, cnt]``, bias included), ``glp`` / ``gh`` / ``tok`` / ``stats`` (views from
    the chunk's first row; ``glp`` / ``gh`` may be None), the slice's first column ``v0``:
    ``d z = (g_lp (onehot(tok - v0) - p) - g_H p ((z - m) - sum p (z - m))) / T``, 0 on
    padding rows; with a bias also, into row ``b`` of ``dbp`` (a ``[blocks, cnt]`` view, or
    None), the column sums of ``d z`` over the chunk's rows ``[b B, (b + 1) B)`` with ``B =
    dz_block_rows``. Then ``d hidden_c += d z_c @ W_s`` (an fp32 ``[N, H]`` accumulator;
    every call ``[C, S] x [S, H]``) and ``d W_s = d z_G^T @ h_G`` (fp32 ``[S, H]``
    accumulator when N spans several groups, else written once in the weight's dtype). The
    logits and ``d hidden`` GEMMs have the same shapes whatever N, so a row's ``d hidden``
    does not depend on the batch; ``d W``, ``d b`` sum over all rows in a fixed order.

    Extra memory: ``d z [G, S]`` (<= ``dz_bytes``), the fp32 ``[N, H]`` accumulator, ``y [C,
    S]`` fp32, ``[S, H]`` fp32 (several groups only), a zero-padded copy of ``hidden``,
    ``W_s`` converted (a rounding head precision), the bias partials ``[chunks * C / B, S]``
    fp32."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    prec = precision(hidden.dtype, head_precision)
    has_glp = grad_logp is not None
    has_gh = grad_entropy is not None
    if n == 0 or not (has_glp or has_gh):
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                None if bias is None else torch.zeros_like(bias))
    c = chunk_rows(vocab, rows)
    s_cols = min(vocab, SLICE_COLS if slice_cols is None else int(slice_cols))
    dzt = prec.dz_dtype
    group = max(c, dz_bytes // (dzt.itemsize * s_cols) // c * c)
    tok = tokens.contiguous()
    glp = grad_logp.contiguous() if has_glp else None
    gh = grad_entropy.contiguous() if has_gh else None
    live = (tok != ignore_index)[:, None]
    # hidden with padding rows zeroed and rows past N zero: every chunk is a [C, H] view
    n_pad = _cdiv(n, c) * c
    h_op = round_operand(hidden, prec)
    h_pad = torch.zeros((n_pad, dim), dtype=h_op.dtype, device=hidden.device)
    h_pad[:n] = torch.where(live, h_op, 0)
    dz = torch.empty((min(group, n_pad), s_cols), dtype=dzt, device=hidden.device)
    y = torch.empty((c, s_cols), dtype=cdt, device=hidden.device)
    blocks = _cdiv(c, dz_block_rows)  # bias partial rows per chunk
    # (zeros: the last chunk's blocks past N are never written and add 0)
    dbp = (torch.zeros((n_pad // c * blocks, s_cols), dtype=cdt, device=hidden.device)
           if bias is not None else None)
    dh = torch.zeros((n_pad, dim), dtype=cdt, device=hidden.device)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_b = None if bias is None else torch.empty(vocab, dtype=cdt, device=weight.device)
    dw_acc = (torch.empty((s_cols, dim), dtype=cdt, device=hidden.device)
              if n_pad > group else None)
    with tf32(head_precision == "tf32", hidden.device), _device(hidden):
        for v0 in range(0, vocab, s_cols):
            cnt_v = min(s_cols, vocab - v0)
            w_op = round_operand(weight[v0:v0 + cnt_v], prec)
            b_s = None if bias is None else bias[v0:v0 + cnt_v].to(cdt)
            ys = y[:, :cnt_v]
            for g0 in range(0, n_pad, group):
                g_cnt = min(group, n_pad - g0)
                for r0 in range(g0, g0 + g_cnt, c):
                    n_live = max(0, min(c, n - r0))
                    mm(h_pad[r0:r0 + c], w_op.t(), cdt, out=ys)
                    if b_s is not None:
                        ys += b_s
                    dz_c = dz[r0 - g0:r0 - g0 + c, :cnt_v]
                    if n_live < c:
                        dz_c[n_live:] = 0  # rows past N: zero, out of d W's sum
                    k = r0 // c * blocks
                    dz_kernel(ys, glp[r0:] if has_glp else None, gh[r0:] if has_gh else None,
                              tok[r0:], stats[r0:], dz_c,
                              None if dbp is None else dbp[k:k + blocks, :cnt_v], n_live, v0,
                              temperature, ignore_index)
                    if dim > 0:
                        dh[r0:r0 + c] += mm(dz_c, w_op, cdt)
                if dim > 0:
                    part = dz[:g_cnt, :cnt_v].t()
                    h_g = h_pad[g0:g0 + g_cnt]
                    if dw_acc is None:
                        if part.dtype == h_g.dtype == weight.dtype and part.is_cuda:
                            torch.mm(part, h_g, out=grad_w[v0:v0 + cnt_v])  # one rounding
                        else:
                            grad_w[v0:v0 + cnt_v] = mm(part, h_g, cdt)
                    elif g0 == 0:
                        mm(part, h_g, cdt, out=dw_acc[:cnt_v])
                    else:
                        dw_acc[:cnt_v] += mm(part, h_g, cdt)
            if dw_acc is not None and dim > 0:
                grad_w[v0:v0 + cnt_v] = dw_acc[:cnt_v]
            if dim == 0:
                grad_w[v0:v0 + cnt_v] = 0
            if grad_b is not None:
                torch.sum(dbp[:, :cnt_v], 0, out=grad_b[v0:v0 + cnt_v])
    grad_h = dh[:n].to(hidden.dtype)
    return (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))


# ========================================================================= sparse log-probs

def logit_chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 rows: Optional[int]):
    """``(r0, cnt, hbuf, y)`` per chunk of ``C`` rows: ``y = hbuf @ W^T (+ b)`` in the
    compute dtype, every call ``[C, H] x [H, V]`` (the last chunk zero-padded: batch
    invariant). ``hbuf`` and ``y`` are reused buffers: consume them before the next chunk."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    c = chunk_rows(vocab, rows)
    hbuf = torch.zeros((c, dim), dtype=weight.dtype, device=hidden.device)
    y = torch.empty((c, vocab), dtype=cdt, device=hidden.device)
    b = None if bias is None else bias.to(cdt)
    for r0 in range(0, n, c):
        cnt = min(c, n - r0)
        hbuf[:cnt] = hidden[r0:r0 + cnt]
        if cnt < c:
            hbuf[cnt:] = 0
        mm(hbuf, weight.t(), cdt, out=y)
        if b is not None:
            y += b
        yield r0, cnt, hbuf, y


def _csr_chunk_of(offsets: Tensor, nnz: int, c: int) -> Tensor:
    """The chunk (row // ``c``) of every CSR position, on device (no host sync)."""
    pos = torch.arange(nnz, dtype=offsets.dtype, device=offsets.device)
    return (torch.searchsorted(offsets, pos, right=True) - 1) // c


def sparse_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], indices: Tensor,
                   temperature: float, normalize: str, with_tail: bool,
                   rows: Optional[int], *, sparse_forward_kernel: Callable,
                   offsets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, tail [N], stats [N, 3])`` of ``sparse_logprobs`` on the logits: per chunk
    (:func:`logit_chunks`), ``sparse_forward_kernel(y[:cnt], indices_c, temperature,
    normalize, with_tail)``. ``indices [N, K]`` -> ``logp [N, K]``; with ``offsets [N + 1]``
    (a CSR support, ``indices [nnz]``) the kernel gets the chunk's view ``offsets[r0 : r0 +
    cnt + 1]`` (absolute positions) and ``logp [nnz]`` takes each position from the chunk
    that holds its row."""
    n = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype)
    tail = hidden.new_empty(n, dtype=cdt)
    stats = hidden.new_empty(n, 3, dtype=cdt)
    csr = offsets is not None
    logp = hidden.new_empty(indices.shape, dtype=cdt)
    if csr and n:
        where = _csr_chunk_of(offsets, indices.shape[0], chunk_rows(weight.shape[0], rows))
    for r0, cnt, _, y in logit_chunks(hidden, weight, bias, rows):
        if csr:
            lp, t, st = sparse_forward_kernel(y[:cnt], indices, temperature, normalize,
                                              with_tail, offsets=offsets[r0:r0 + cnt + 1])
            logp = torch.where(where == r0 // y.shape[0], lp, logp)
        else:
            lp, t, st = sparse_forward_kernel(y[:cnt], indices[r0:r0 + cnt], temperature,
                                              normalize, with_tail)
            logp[r0:r0 + cnt] = lp
        tail[r0:r0 + cnt] = t
        stats[r0:r0 + cnt] = st
    return logp, tail, stats


def sparse_backward(grad_logp: Tensor, grad_tail: Optional[Tensor], hidden: Tensor,
                    weight: Tensor, bias: Optional[Tensor], indices: Tensor, logp: Tensor,
                    tail: Tensor, stats: Tensor, temperature: float, normalize: str,
                    rows: Optional[int], *, sparse_backward_kernel: Callable,
                    offsets: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)``: per chunk, the logits again, ``d z [C, V]``
    (fp32; rows past N zero) from ``sparse_backward_kernel(grad_logp_c, grad_tail_c,
    y[:cnt], indices_c, logp_c, tail_c, stats_c, temperature, normalize)`` (CSR: the whole
    ``[nnz]`` ``indices`` / ``grad_logp`` / ``logp`` and ``offsets=`` the chunk's view),
    then ``d hidden_c = d z W``, ``d W += d z^T h_c``, ``d b += sum d z`` through ``torch.mm``
    in fp32 (every GEMM the same shape whatever N)."""
    n, dim = hidden.shape
    cdt = compute_dtype(hidden.dtype)
    grad_h = hidden.new_empty(n, dim, dtype=cdt)
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    grad_b = None if bias is None else torch.zeros(weight.shape[0], dtype=cdt,
                                                   device=weight.device)
    dz = None
    for r0, cnt, hbuf, y in logit_chunks(hidden, weight, bias, rows):
        sl = slice(r0, r0 + cnt)
        if dz is None:
            dz = torch.zeros_like(y)
        g_tail = None if grad_tail is None else grad_tail[sl]
        if offsets is None:
            dz[:cnt] = sparse_backward_kernel(grad_logp[sl], g_tail, y[:cnt], indices[sl],
                                              logp[sl], tail[sl], stats[sl], temperature,
                                              normalize)
        else:
            dz[:cnt] = sparse_backward_kernel(grad_logp, g_tail, y[:cnt], indices, logp,
                                              tail[sl], stats[sl], temperature, normalize,
                                              offsets=offsets[r0:r0 + cnt + 1])
        dz[cnt:] = 0
        grad_h[sl] = mm(dz, weight, cdt)[:cnt]
        grad_w += mm(dz.t(), hbuf, cdt)
        if grad_b is not None:
            grad_b += dz.sum(0)
    return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
