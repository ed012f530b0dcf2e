"""Launchers for csrc/vocab.cu: ``token_logprobs`` (with entropy) and ``kl_divergence``
(``sparse_logprobs`` and ``sparse_kl`` are in :mod:`rlkernels.cuda.sparse`).

Same signatures, outputs and saved row statistics as :mod:`rlkernels.reference.vocab`
(which states the math) and :mod:`rlkernels.triton.vocab`, so the ops layer calls them the
same way. One CUDA block per row; see the kernels' comments for the formulas.

Inputs: ``logits [N, V]`` may be any 2-D view with unit column stride (``logits[:, :-1]``,
``logits[..., :V]`` of a wider buffer, any storage offset): it reaches the kernels as its
pointer and row stride, no copy, and each row's 16-byte alignment is decided on the device
from its own address (the chunk layout, hence every bit of the result, does not depend on
it). A column-strided tensor (``stride(-1) != 1``) is still copied to unit stride by
``unit_stride`` (an N x V temporary: the one case SPEC's "no [N, V] intermediates" is not met).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _codes
from ._common import (DTYPE_CODES, FLOAT_DTYPES, INDEX_DTYPES, compute_dtype, expect, extension,
                      matrix, rows, stream_of, unit_stride)

Tensor = torch.Tensor

_KINDS = _codes.KL_KINDS


def _logits(name: str, logits: Tensor) -> Tuple[int, int]:
    """``(N, V)`` of 2-d CUDA logits (N < 2**31 and V >= 1 are checked in C++)."""
    expect(name, logits, FLOAT_DTYPES, ndim=2)
    return logits.shape[0], logits.shape[1]


def _tokens(tokens: Optional[Tensor], n: int, like: Tensor) -> Optional[Tensor]:
    if tokens is None:
        return None
    expect("tokens", tokens, INDEX_DTYPES, shape=(n,), like=like)
    return tokens.to(torch.int64)  # the kernels read int64 ids (a copy only for int32)


def _row_vector(name: str, t: Optional[Tensor], n: int, cdt: torch.dtype,
                like: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    expect(name, t, FLOAT_DTYPES, shape=(n,), like=like)
    return t.to(cdt)


# ================================================================== token_logprobs / entropy

def token_logprobs_forward(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                           ignore_index: int, with_entropy: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [N], entropy [N], stats [N, 3])`` like the reference (fp32, fp64 for
    fp64 logits). ``tokens=None``: entropy only, ``logp`` all 0. Padding rows (token ==
    ignore_index): 0 outputs, ``stats`` row 0 (never read)."""
    C = extension()
    n, vocab = _logits("logits", logits)
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    tok = _tokens(tokens, n, x)
    logp = torch.empty(n, dtype=cdt, device=x.device)
    ent = torch.empty(n, dtype=cdt, device=x.device)
    stats = torch.empty(n, 3, dtype=cdt, device=x.device)
    if n == 0:
        return logp, ent, stats
    with torch.cuda.device(x.device):
        C.token_logprobs_forward(
            logits=rows(C, x), tokens=rows(C, tok), logp=logp.data_ptr(), ent=ent.data_ptr(),
            stats=stats.data_ptr(), n=n, vocab=vocab, dtype=DTYPE_CODES[x.dtype],
            inv_temperature=1.0 / temperature, ignore_index=int(ignore_index),
            with_entropy=bool(with_entropy), stream=stream_of(x))
    return logp, ent, stats


def token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            logits: Tensor, tokens: Optional[Tensor], stats: Tensor,
                            temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` in its dtype: ``(g (onehot(y) - p) - g_H p (z - sum p z))
    / T``, exactly 0 on padding rows. ``out`` may be ``logits`` itself (in-place backward)."""
    C = extension()
    n, vocab = _logits("logits", logits)
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    tok = _tokens(tokens, n, x)
    if tok is None:
        grad_logp = None  # no token, no log-prob term (as the other backends)
    glp = _row_vector("grad_logp", grad_logp, n, cdt, x)
    gh = _row_vector("grad_entropy", grad_entropy, n, cdt, x)
    expect("stats", stats, (cdt,), shape=(n, 3), like=x)
    if out is None:
        out = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    else:
        expect("out", out, (logits.dtype,), shape=(n, vocab), like=x)
    if n == 0:
        return out
    # the kernel writes unit-stride rows; anything else goes through a temporary
    dst = out if (out.stride(-1) == 1 or vocab == 1) else torch.empty_like(x)
    with torch.cuda.device(x.device):
        C.token_logprobs_backward(
            grad_logp=rows(C, glp), grad_entropy=rows(C, gh), logits=rows(C, x),
            tokens=rows(C, tok), stats=matrix(C, stats), out=rows(C, dst), n=n, vocab=vocab,
            dtype=DTYPE_CODES[x.dtype], inv_temperature=1.0 / temperature,
            ignore_index=int(ignore_index), stream=stream_of(x))
    if dst is not out:
        out.copy_(dst)
    return out


# ============================================================================= kl_divergence

def _pair(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor]
          ) -> Tuple[int, int, Optional[Tensor]]:
    n, vocab = _logits("logits", logits)
    expect("ref_logits", ref_logits, (logits.dtype,), shape=(n, vocab), like=logits)
    mask = None
    if ignore_mask is not None:
        expect("ignore_mask", ignore_mask, (torch.bool,), shape=(n,), like=logits)
        mask = ignore_mask.view(torch.uint8)
    return n, vocab, mask


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [N], stats_p [N, 3], stats_q [N, 3])`` like the reference; the third
    columns hold ``sum p a_p`` and ``sum q a_q`` (kinds ``"alpha"`` and ``"tv"``: the
    divergence and 0, so ``kl = stats_p[:, 2] + stats_q[:, 2]`` for every kind). Kind
    ``"alpha"``: ``beta`` carries alpha, strictly inside (0, 1) (the ops layer maps 0 and 1
    to ``"forward"`` and ``"reverse"``). ``ignore_mask`` rows: 0, not read."""
    C = extension()
    n, vocab, mask = _pair(logits, ref_logits, ignore_mask)
    x, y = unit_stride(logits), unit_stride(ref_logits)
    cdt = compute_dtype(x.dtype)
    kl = torch.empty(n, dtype=cdt, device=x.device)
    stats_p = torch.empty(n, 3, dtype=cdt, device=x.device)
    stats_q = torch.empty(n, 3, dtype=cdt, device=x.device)
    if n == 0:
        return kl, stats_p, stats_q
    with torch.cuda.device(x.device):
        C.kl_divergence_forward(
            logits=rows(C, x), ref_logits=rows(C, y), ignore_mask=rows(C, mask),
            kl=kl.data_ptr(), stats_p=stats_p.data_ptr(), stats_q=stats_q.data_ptr(), n=n,
            vocab=vocab, dtype=DTYPE_CODES[x.dtype], kind=_KINDS[kind], beta=float(beta),
            inv_temperature=1.0 / temperature, stream=stream_of(x))
    return kl, stats_p, stats_q


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, in their
    dtype, one pass over the row pair (kind ``"tv"``: two, the first sums ``sum p s`` and
    ``sum q s``, ``s = sign(p - q)``, which the ``[N, 3]`` statistics do not hold);
    ``ignore_mask`` rows receive exactly 0."""
    C = extension()
    n, vocab, mask = _pair(logits, ref_logits, ignore_mask)
    x, y = unit_stride(logits), unit_stride(ref_logits)
    cdt = compute_dtype(x.dtype)
    g = _row_vector("grad_kl", grad_kl, n, cdt, x)
    expect("stats_p", stats_p, (cdt,), shape=(n, 3), like=x)
    expect("stats_q", stats_q, (cdt,), shape=(n, 3), like=x)
    grad_z = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    grad_w = (torch.empty((n, vocab), dtype=ref_logits.dtype, device=ref_logits.device)
              if need_ref_grad else None)
    if n == 0:
        return grad_z, grad_w
    with torch.cuda.device(x.device):
        C.kl_divergence_backward(
            grad_kl=rows(C, g), logits=rows(C, x), ref_logits=rows(C, y),
            ignore_mask=rows(C, mask), stats_p=matrix(C, stats_p), stats_q=matrix(C, stats_q),
            grad_logits=rows(C, grad_z), grad_ref=rows(C, grad_w), n=n, vocab=vocab,
            dtype=DTYPE_CODES[x.dtype], kind=_KINDS[kind], beta=float(beta),
            inv_temperature=1.0 / temperature, stream=stream_of(x))
    return grad_z, grad_w


__all__ = ["token_logprobs_forward", "token_logprobs_backward", "kl_divergence_forward",
           "kl_divergence_backward"]
