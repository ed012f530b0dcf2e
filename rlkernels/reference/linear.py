"""Reference kernels of the fused lm_head ops (hidden states in).

``z = (hidden @ weight^T + bias) / T`` is formed one row chunk at a time (about
``CHUNK_ELEMENTS`` logits), in fp32 (fp64 for fp64), and handed to the vocabulary reference
kernels; the ``[N, V]`` logits never exist. Backward recomputes each chunk's logits, forms
``d z`` with the vocabulary backward, and accumulates ``d hidden = d z @ W``,
``d W += d z^T @ hidden`` and ``d bias += sum(d z)`` in fp32.

Models whose lm_head output goes through a scale and a soft cap before the softmax (Gemma's
``final_logit_softcapping``, ``logit_scale``) use the ``linear_token_stats`` kernels: the map
of :func:`_head_map` is applied to each chunk before the vocabulary kernels, and its derivative
multiplies ``d z`` in backward. They also give the extra per-row statistics of
:func:`_extra_stats` (what TRL's fused lm_head reports for its metrics).

``head_precision`` (SPEC 6) is the precision of the GEMMs' operands: ``None`` keeps the
inputs' values; ``"bf16"`` rounds ``hidden``, ``weight`` and, in backward, ``d z`` to bf16
before each GEMM; ``"fp32"`` and ``"tf32"`` round them to fp32 (a no-op unless the inputs are
fp64). The reference computes ``"tf32"`` as ``"fp32"``: TF32 is a GPU tensor-core mode whose
10-bit operand rounding the fused backends may apply; the ground truth stays exact.
Accumulation is in the compute dtype (fp32, fp64 for fp64) always.

For exactness the reference keeps an fp32 copy of a half-precision ``weight`` and an fp32
gradient accumulator (``2 V H`` floats); the fused kernels of other backends do not.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _rows
from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions
from . import (as_flat, as_rows, compute_dtype, grad_in_shape, head_outputs, row_chunks,
               rows_per_chunk)
from . import policy as _policy
from . import sparse as _sparse
from . import vocab as _vocab

Tensor = torch.Tensor

# linear_token_logprobs and linear_grpo_loss take the public shapes (hidden [..., H], tokens
# [...]; per-token outputs [...], d hidden in hidden's shape): rlkernels.ops._table skips
# those ops' maps and views (the other ops of this family keep them)
ND_ROWS = frozenset({"linear_token_logprobs", "linear_grpo_loss"})


def _rows_matmul(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """``a @ b`` computed as a product of exactly ``rows`` rows (``a`` zero-padded).

    A CPU GEMM picks its blocking, and with it the rounding of each dot product, from the
    shape: padding every call to one shape makes a row's result independent of how many
    other rows share its chunk (batch invariance, SPEC section 1).
    """
    if a.shape[0] == rows:
        return a @ b
    padded = a.new_zeros(rows, a.shape[1])
    padded[:a.shape[0]] = a
    return (padded @ b)[:a.shape[0]]


HEAD_PRECISIONS = ("bf16", "tf32", "fp32")


def _round(x: Tensor, head_precision: Optional[str], cdt: torch.dtype) -> Tensor:
    """A GEMM operand rounded to the head precision, then held in the compute dtype."""
    if head_precision is None:
        return x.to(cdt)
    if head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision: expected None or one of {HEAD_PRECISIONS}, got "
                         f"{head_precision!r}")
    rounded = torch.bfloat16 if head_precision == "bf16" else torch.float32
    if x.dtype == rounded or x.dtype.itemsize < rounded.itemsize:
        return x.to(cdt)  # exact in the head precision already
    return x.to(rounded).to(cdt)


def _logits_chunk(h: Tensor, w: Tensor, b: Optional[Tensor], rows: int) -> Tensor:
    z = _rows_matmul(h, w.T, rows)
    return z + b if b is not None else z


def _logit_chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  head_precision: Optional[str]):
    """``(rows, h, y)`` for each row chunk: the chunk's rounded hidden states and its lm_head
    output ``y = h @ W^T + b`` in the compute dtype (fp32, fp64 for fp64)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    w = _round(weight, head_precision, cdt)
    b = None if bias is None else bias.to(cdt)
    step = rows_per_chunk(vocab)
    for rows in row_chunks(n, vocab):
        h = _round(hidden[rows], head_precision, cdt)
        yield rows, h, _logits_chunk(h, w, b, step)


def _head_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                head_precision: Optional[str], chunk_grad
                ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias)`` from ``d y = chunk_grad(rows, y)`` of each row chunk:
    ``d hidden = d y @ W``, ``d W = sum d y^T h``, ``d b = sum d y`` (accumulated in the
    compute dtype, returned in each input's dtype; ``d b`` is None without a bias)."""
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    w = _round(weight, head_precision, cdt)
    grad_h = torch.empty_like(hidden)
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    grad_b = None if bias is None else torch.zeros(vocab, dtype=cdt, device=weight.device)
    step = rows_per_chunk(vocab)
    for rows, h, y in _logit_chunks(hidden, weight, bias, head_precision):
        dy = _round(chunk_grad(rows, y), head_precision, cdt)
        grad_h[rows] = _rows_matmul(dy, w, step)
        grad_w += dy.T @ h
        if grad_b is not None:
            grad_b += dy.sum(0)
    return (grad_h, grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


def _head_map(y: Tensor, logit_scale: float, softcap: Optional[float]):
    """The elementwise map some models apply to the lm_head output before the softmax:
    ``u = logit_scale * y``, then with a soft cap ``c``: ``c * tanh(u / c)`` (Gemma 2/3),
    else ``u``. Returns ``(f(y), f'(y))``; ``f'(y) = logit_scale * (1 - tanh(u / c)^2)``."""
    u = y * logit_scale if logit_scale != 1.0 else y
    if softcap is None:
        return u, None
    t = torch.tanh(u / softcap)
    return softcap * t, logit_scale * (1.0 - t * t)


def _extra_stats(z: Tensor, tok: Tensor, temperature: float, ignore_index: int) -> Tensor:
    """``[rows, 3]``: ``log sum_j p_j^2``, ``mean_j z_j / T`` over all ``V`` columns and
    ``1.0`` where the token is the arg-max of the row (the FIRST maximum, as ``argmax``: a tie
    with an earlier column does not count), with ``p = softmax(z / T)``; 0 on padding rows."""
    zt = _vocab._scaled(z, slice(None), temperature)
    log_sum_sq = torch.logsumexp(2 * zt, -1) - 2 * torch.logsumexp(zt, -1)
    top1 = (zt.argmax(-1) == tok).to(zt.dtype)
    out = torch.stack([log_sum_sq, zt.mean(-1), top1], 1)
    return torch.where((tok == ignore_index)[:, None], 0.0, out)


def linear_token_stats_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                               tokens: Tensor, temperature: float, ignore_index: int,
                               with_entropy: bool, logit_scale: float, softcap: Optional[float],
                               extras: bool, head_precision: Optional[str] = None
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``token_logprobs`` of the logits ``z = f(hidden @ weight^T + bias)`` (``f``: see
    :func:`_head_map`; the temperature divides ``f``'s output). Returns ``(logp [N], entropy
    [N], stats [N, 3], extra [N, 3])``; ``extra`` (:func:`_extra_stats`) is all zeros unless
    ``extras``. ``head_precision``: :func:`_round` of ``hidden`` and ``weight``."""
    n = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype)
    outs = [hidden.new_empty(n, dtype=cdt), hidden.new_empty(n, dtype=cdt),
            hidden.new_empty(n, 3, dtype=cdt), hidden.new_zeros(n, 3, dtype=cdt)]
    for rows, _, y in _logit_chunks(hidden, weight, bias, head_precision):
        z, _ = _head_map(y, logit_scale, softcap)
        chunk = _vocab.token_logprobs_forward(z, tokens[rows], temperature, ignore_index,
                                              with_entropy)
        for out, value in zip(outs, chunk):
            out[rows] = value
        if extras:
            outs[3][rows] = _extra_stats(z, tokens[rows].long(), temperature, ignore_index)
    return tuple(outs)


def linear_token_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  tokens: Tensor, temperature: float, ignore_index: int,
                                  with_entropy: bool, head_precision: Optional[str] = None,
                                  path: str = "auto", rows: Optional[Tensor] = None
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [...], entropy [...], stats [..., 3])`` as ``token_logprobs`` of the
    logits, for ``hidden [..., H]`` and ``tokens [...]``. ``path``: the fused backends'
    implementation choice; the reference has one (ignored). ``rows``: only those of the
    ``N`` rows are computed, the others are padding (:mod:`rlkernels._rows`)."""
    if hidden.dim() != 2:
        return head_outputs(linear_token_logprobs_forward(
            as_rows(hidden), weight, bias, as_flat(tokens), temperature, ignore_index,
            with_entropy, head_precision, path, rows), hidden.shape[:-1])
    if rows is not None:
        return _rows.forward(
            lambda h, tok: linear_token_logprobs_forward(h, weight, bias, tok, temperature,
                                                         ignore_index, with_entropy,
                                                         head_precision),
            rows, hidden, tokens)
    return linear_token_stats_forward(hidden, weight, bias, tokens, temperature, ignore_index,
                                      with_entropy, 1.0, None, False, head_precision)[:3]


def linear_token_stats_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                tokens: Tensor, stats: Tensor, temperature: float,
                                ignore_index: int, logit_scale: float, softcap: Optional[float],
                                head_precision: Optional[str] = None
                                ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``hidden``, ``weight`` and ``bias`` (``None`` without bias), each in the
    dtype of its input: ``d y = d z * f'(y)`` (chain rule through :func:`_head_map`);
    ``head_precision``: :func:`_round` of every GEMM operand (``d z`` included)."""
    def chunk_grad(rows, y):
        z, dzdy = _head_map(y, logit_scale, softcap)
        dz = _vocab.token_logprobs_backward(
            None if grad_logp is None else grad_logp[rows],
            None if grad_entropy is None else grad_entropy[rows],
            z, tokens[rows], stats[rows], temperature, ignore_index)
        if dzdy is not None:
            return dz * dzdy
        return dz * logit_scale if logit_scale != 1.0 else dz

    return _head_grads(hidden, weight, bias, head_precision, chunk_grad)


def linear_token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                   hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   tokens: Tensor, stats: Tensor, temperature: float,
                                   ignore_index: int, head_precision: Optional[str] = None,
                                   path: str = "auto", rows: Optional[Tensor] = None
                                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``hidden``, ``weight`` and ``bias`` (``None`` without bias), each in the
    dtype and shape of its input (``rows``: as the forward's)."""
    if hidden.dim() != 2:
        gh, gw, gb = linear_token_logprobs_backward(
            as_flat(grad_logp), as_flat(grad_entropy), as_rows(hidden), weight, bias,
            as_flat(tokens), as_rows(stats), temperature, ignore_index, head_precision, path,
            rows)
        return grad_in_shape(gh, hidden.shape), gw, gb
    if rows is not None:
        return _rows.backward(
            lambda glp, gh, h, tok, st: linear_token_logprobs_backward(
                glp, gh, h, weight, bias, tok, st, temperature, ignore_index, head_precision),
            rows, grad_logp, grad_entropy, hidden, tokens, stats)
    return linear_token_stats_backward(grad_logp, grad_entropy, hidden, weight, bias, tokens,
                                       stats, temperature, ignore_index, 1.0, None,
                                       head_precision)


def linear_sparse_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   indices: Tensor, temperature: float, normalize: str,
                                   with_tail: bool, offsets: Optional[Tensor] = None
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``sparse_logprobs`` of the logits ``hidden @ weight^T + bias``, one row chunk at a
    time: ``(logp [N, K], tail [N], stats [N, 3])`` (see
    :func:`rlkernels.reference.sparse.sparse_logprobs_forward`). CSR (``offsets [N + 1]``):
    ``logp [nnz]``; a chunk of rows ``r0 .. r1`` passes ``offsets[r0:r1 + 1]`` with the
    whole ``indices`` and writes its positions of ``logp`` (absolute positions)."""
    n = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype)
    # CSR: positions of no row (malformed offsets) stay -inf
    logp = hidden.new_empty(indices.shape, dtype=cdt) if offsets is None else \
        hidden.new_full(indices.shape, float("-inf"), dtype=cdt)
    outs = (logp, hidden.new_empty(n, dtype=cdt), hidden.new_empty(n, 3, dtype=cdt))
    for rows, _, z in _logit_chunks(hidden, weight, bias, None):
        if offsets is None:
            chunk = _sparse.sparse_logprobs_forward(z, indices[rows], temperature, normalize,
                                                    with_tail)
        else:
            chunk = _sparse.sparse_logprobs_forward(
                z, indices, temperature, normalize, with_tail,
                offsets[rows.start:rows.stop + 1], _out=outs[0])
        for out, value in zip(outs[offsets is not None:], chunk[offsets is not None:]):
            out[rows] = value
    return outs


def linear_sparse_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor],
                                    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    indices: Tensor, logp: Tensor, tail: Tensor, stats: Tensor,
                                    temperature: float, normalize: str,
                                    offsets: Optional[Tensor] = None
                                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``hidden``, ``weight`` and ``bias`` (``None`` without bias): ``d z``
    of :func:`rlkernels.reference.sparse.sparse_logprobs_backward` on each chunk's logits,
    then the lm_head GEMMs of :func:`_head_grads` (CSR: a chunk passes its offsets' view and
    the whole flat ``indices``, ``grad_logp``, ``logp``)."""
    def chunk_grad(rows, z):
        g_tail = None if grad_tail is None else grad_tail[rows]
        if offsets is not None:
            return _sparse.sparse_logprobs_backward(
                grad_logp, g_tail, z, indices, logp, tail[rows], stats[rows], temperature,
                normalize, offsets[rows.start:rows.stop + 1])
        return _sparse.sparse_logprobs_backward(
            grad_logp[rows], g_tail, z, indices[rows],
            logp[rows], tail[rows], stats[rows], temperature, normalize)

    return _head_grads(hidden, weight, bias, None, chunk_grad)


def linear_grpo_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                             mask: Tensor, normalizer: Optional[Tensor],
                             ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                             temperature: float, o: PolicyOptions,
                             head_precision: Optional[str] = None, path: str = "auto",
                             rows: Optional[Tensor] = None):
    """``policy_loss`` of the log-probs and entropies of ``hidden @ weight^T``: returns
    ``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``."""
    return fused_forward(
        lambda tok: linear_token_logprobs_forward(hidden, weight, bias, tok, temperature, -100,
                                                  True, head_precision, path, rows),
        _policy.policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def linear_grpo_loss_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                              bias: Optional[Tensor], tokens: Tensor, old_logp: Tensor,
                              advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                              ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                              logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                              o: PolicyOptions, head_precision: Optional[str] = None,
                              path: str = "auto", rows: Optional[Tensor] = None):
    """Gradients w.r.t. ``hidden``, ``weight``, ``bias``: the policy-loss gradients of the
    per-token log-probs and entropies pushed through the lm_head backward."""
    g_lp, g_ent = row_grads(_policy.policy_loss_backward, grad_loss, logp, ent, old_logp,
                            advantages, mask, normalizer, ref_logp, is_weights, o)
    return linear_token_logprobs_backward(g_lp, g_ent, hidden, weight, bias,
                                          tokens.reshape(-1), stats, temperature, -100,
                                          head_precision, path, rows)
