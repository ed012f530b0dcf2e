"""The fused lm_head ops on the cuda backend: ``linear_token_logprobs``, ``linear_grpo_loss``
and ``linear_sparse_logprobs`` without materializing the ``[N, V]`` logits.

Same launcher signatures, outputs and row statistics as :mod:`rlkernels.reference.linear`
(which states the math) and the triton backend's cuBLAS path: the chunk loops of
:mod:`rlkernels._cublas_head` (GEMMs through ``torch.mm``, i.e. cuBLAS; fixed-size
zero-padded row chunks, batch invariant by construction) with this backend's kernels on each
chunk of fp32 logits: :func:`rlkernels.cuda.vocab.token_logprobs_forward` (forward),
``linear_dz`` of csrc/linear.cu (backward: ``d z`` of a vocabulary slice from the saved row
statistics, and the bias partials), :mod:`rlkernels.cuda.sparse` (``linear_sparse_logprobs``).

``path``: ``"auto"`` and ``"cublas"`` are this path; ``"triton"`` (the triton backend's own
GEMM kernels) is a ValueError naming ``path``. ``rows``: only those rows are computed, the
others are padding (:mod:`rlkernels._rows`). ``head_precision``:
:func:`rlkernels._cublas_head.precision`. The private TRL head (``linear_token_stats``) has no
cuda kernels (the op table does not list this backend for it).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _cublas_head as head
from .. import _rows
from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions
from . import sparse as _sparse
from . import vocab as _vocab
from ._common import DTYPE_CODES, expect, extension, matrix, rows, stream_of
from .policy import policy_loss_backward, policy_loss_forward

Tensor = torch.Tensor

PATHS = ("auto", "cublas")
# rows of d z per bias partial (csrc/linear.cu: one CUDA block's rows); a constant, so the
# column sums of d b never depend on N
_DZ_BLOCK_ROWS = 32


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} on the cuda backend (its lm_head "
                         f"runs the GEMMs through cuBLAS; 'triton' is the triton backend's), "
                         f"got {path!r}")


def _check_rows(rows_: Tensor, hidden: Tensor) -> None:
    if not isinstance(rows_, Tensor) or rows_.dim() != 1 or rows_.dtype != torch.int64:
        got = (f"{rows_.dtype} {tuple(rows_.shape)}" if isinstance(rows_, Tensor)
               else type(rows_).__name__)
        raise ValueError(f"rows: expected a 1-d int64 tensor of row indices, got {got}")
    if rows_.device != hidden.device:
        raise ValueError(f"rows: expected a tensor on {hidden.device} (hidden's device), got "
                         f"{rows_.device}")


def _dz_slice(y: Tensor, glp: Optional[Tensor], gh: Optional[Tensor], tok: Tensor,
              stats: Tensor, dz: Tensor, dbp: Optional[Tensor], n_live: int, v0: int,
              temperature: float, ignore_index: int) -> None:
    """The "d z of a slice" kernel of :func:`rlkernels._cublas_head.token_backward`:
    csrc/linear.cu ``linear_dz`` on rows ``< n_live`` of ``y [C, cnt]`` (fp32 / fp64
    logits of columns ``v0 .. v0 + cnt``): ``dz [C, cnt]`` in its dtype and, with ``dbp``,
    the column sums per ``_DZ_BLOCK_ROWS`` rows."""
    if n_live == 0:
        return
    C = extension()
    cdt = y.dtype
    expect("logits", y, (torch.float32, torch.float64), ndim=2)
    expect("dz", dz, (torch.bfloat16, torch.float32, torch.float64), shape=tuple(y.shape),
           like=y)
    expect("tokens", tok, (torch.int64,), ndim=1, like=y)
    expect("stats", stats, (cdt,), ndim=2, like=y)
    for name, t in (("grad_logp", glp), ("grad_entropy", gh)):
        if t is not None:
            expect(name, t, (cdt,), ndim=1, like=y)
    if dbp is not None:
        expect("bias_partials", dbp, (cdt,), ndim=2, like=y)
    with torch.cuda.device(y.device):
        C.linear_dz(logits=rows(C, y), grad_logp=rows(C, glp), grad_entropy=rows(C, gh),
                    tokens=rows(C, tok), stats=matrix(C, stats), dz=rows(C, dz),
                    bias_partials=rows(C, dbp), n_rows=n_live, n_live=n_live,
                    cols=y.shape[1], v0=int(v0), rows_per_block=_DZ_BLOCK_ROWS,
                    dtype=DTYPE_CODES[cdt], dz_dtype=DTYPE_CODES[dz.dtype],
                    inv_temperature=1.0 / temperature, ignore_index=int(ignore_index),
                    stream=stream_of(y))


def _vocab_forward(y, tokens, temperature, ignore_index, with_entropy):
    """The "forward on a logits chunk" kernel (looked up at call time: tests replace it)."""
    return _vocab.token_logprobs_forward(y, tokens, temperature, ignore_index, with_entropy)


# ===================================================================== linear_token_logprobs

def linear_token_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  tokens: Tensor, temperature: float, ignore_index: int,
                                  with_entropy: bool, head_precision: Optional[str] = None,
                                  path: str = "auto", rows: Optional[Tensor] = None, *,
                                  chunk_rows: Optional[int] = None
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N], entropy [N], stats [N, 3])`` of ``(hidden @ weight^T + bias) / T`` (fp32;
    fp64 for fp64 inputs), stats ``(m, log s, sum p (z - m))``, zeros on padding rows:
    :func:`rlkernels._cublas_head.token_forward` with the cuda vocabulary forward kernel on
    each ``[C, V]`` chunk (``chunk_rows`` overrides ``C``)."""
    _check_path(path)
    if rows is not None:
        _check_rows(rows, hidden)
        return _rows.forward(
            lambda h, tok: linear_token_logprobs_forward(
                h, weight, bias, tok, temperature, ignore_index, with_entropy, head_precision,
                path, chunk_rows=chunk_rows), rows, hidden, tokens)
    return head.token_forward(hidden, weight, bias, tokens, temperature, ignore_index,
                              with_entropy, head_precision, chunk_rows,
                              vocab_forward=_vocab_forward)


def linear_token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                   hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   tokens: Tensor, stats: Tensor, temperature: float,
                                   ignore_index: int, head_precision: Optional[str] = None,
                                   path: str = "auto", rows: Optional[Tensor] = None, *,
                                   chunk_rows: Optional[int] = None,
                                   slice_cols: Optional[int] = None,
                                   dz_bytes: int = head.DZ_BYTES
                                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)`` in the inputs' dtypes (fp32 accumulation):
    :func:`rlkernels._cublas_head.token_backward` with csrc/linear.cu's ``d z`` kernel,
    ``d z = (g_lp (onehot - p) - g_H p ((z - m) - sum p (z - m))) / T``."""
    _check_path(path)
    if rows is not None:
        _check_rows(rows, hidden)
        return _rows.backward(
            lambda glp, gh, h, tok, st: linear_token_logprobs_backward(
                glp, gh, h, weight, bias, tok, st, temperature, ignore_index, head_precision,
                path, chunk_rows=chunk_rows, slice_cols=slice_cols, dz_bytes=dz_bytes),
            rows, grad_logp, grad_entropy, hidden, tokens, stats)
    cdt = head.compute_dtype(hidden.dtype)
    glp = None if grad_logp is None else grad_logp.to(cdt)
    gh = None if grad_entropy is None else grad_entropy.to(cdt)
    return head.token_backward(glp, gh, hidden, weight, bias, tokens.to(torch.int64), stats,
                               temperature, ignore_index, head_precision, chunk_rows,
                               slice_cols, dz_bytes, dz_kernel=_dz_slice,
                               dz_block_rows=_DZ_BLOCK_ROWS)


# ========================================================================== linear_grpo_loss

def linear_grpo_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                             mask: Tensor, normalizer: Optional[Tensor],
                             ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                             temperature: float, o: PolicyOptions,
                             head_precision: Optional[str] = None, path: str = "auto",
                             rows: Optional[Tensor] = None):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``: the fused lm_head
    forward (log-probs and entropies) then the cuda policy kernel."""
    return fused_forward(
        lambda tok: linear_token_logprobs_forward(hidden, weight, bias, tok, temperature, -100,
                                                  True, head_precision, path, rows=rows),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def linear_grpo_loss_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                              bias: Optional[Tensor], tokens: Tensor, old_logp: Tensor,
                              advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                              ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                              logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                              o: PolicyOptions, head_precision: Optional[str] = None,
                              path: str = "auto", rows: Optional[Tensor] = None):
    """``(d hidden, d weight, d bias or None)``: the cuda policy kernel's gradients w.r.t.
    the log-probs (and entropies when ``entropy_coef != 0``) through the lm_head backward."""
    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp,
                            advantages, mask, normalizer, ref_logp, is_weights, o)
    return linear_token_logprobs_backward(g_lp, g_ent, hidden, weight, bias,
                                          tokens.reshape(-1), stats, temperature, -100,
                                          head_precision, path, rows=rows)


# ==================================================================== linear_sparse_logprobs

def _sparse_kw(offsets: Optional[Tensor]) -> dict:
    # offsets= only for a CSR support, so that padded ids reach kernels without that keyword
    return {} if offsets is None else {"offsets": offsets}


def _sparse_forward_kernel(y, indices, temperature, normalize, with_tail, offsets=None):
    return _sparse.sparse_logprobs_forward(y, indices, temperature, normalize, with_tail,
                                           **_sparse_kw(offsets))


def _sparse_backward_kernel(grad_logp, grad_tail, y, indices, logp, tail, stats, temperature,
                            normalize, offsets=None):
    return _sparse.sparse_logprobs_backward(grad_logp, grad_tail, y, indices, logp, tail, stats,
                                            temperature, normalize, **_sparse_kw(offsets))


def linear_sparse_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   indices: Tensor, temperature: float, normalize: str,
                                   with_tail: bool, offsets: Optional[Tensor] = None, *,
                                   chunk_rows: Optional[int] = None
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, tail [N], stats [N, 3])`` of ``sparse_logprobs`` on the logits ``hidden @
    weight^T + bias``: per chunk of rows (fp32 ``[C, V]`` logits, <= 512 MiB) the cuda sparse
    kernels (:func:`rlkernels._cublas_head.sparse_forward`). ``indices [N, K]`` -> ``logp
    [N, K]``; with ``offsets [N + 1]`` (CSR, ``indices [nnz]``) -> ``logp [nnz]``."""
    return head.sparse_forward(hidden, weight, bias, indices, temperature, normalize, with_tail,
                               chunk_rows, sparse_forward_kernel=_sparse_forward_kernel,
                               offsets=offsets)


def linear_sparse_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor],
                                    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    indices: Tensor, logp: Tensor, tail: Tensor, stats: Tensor,
                                    temperature: float, normalize: str,
                                    offsets: Optional[Tensor] = None, *,
                                    chunk_rows: Optional[int] = None
                                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)``: per chunk, the logits again, ``d z`` from the
    cuda sparse backward kernel (fp32 ``[C, V]``), then the three GEMMs through ``torch.mm``
    (:func:`rlkernels._cublas_head.sparse_backward`)."""
    return head.sparse_backward(grad_logp, grad_tail, hidden, weight, bias, indices, logp, tail,
                                stats, temperature, normalize, chunk_rows,
                                sparse_backward_kernel=_sparse_backward_kernel,
                                offsets=offsets)


__all__ = ["linear_token_logprobs_forward", "linear_token_logprobs_backward",
           "linear_grpo_loss_forward", "linear_grpo_loss_backward",
           "linear_sparse_logprobs_forward", "linear_sparse_logprobs_backward"]
