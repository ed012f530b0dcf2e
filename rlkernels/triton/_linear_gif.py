"""``linear_grpo_loss(..., grad_in_forward=True)`` on the triton backend: the gradient formed
in the forward with three GEMMs instead of four (issue 20).

The default path runs the logits GEMM in the forward and again in the backward (it keeps no
``[N, V]`` logits), then ``d hidden = d z W`` and ``d W = d z^T h``: four GEMMs. For a loss
whose per-token gradient is known from the token's own values (token-level ratios:
:func:`rlkernels._fused.one_pass`), the forward has everything the backward needs while each
chunk of logits is alive, so it forms the gradient there and never recomputes the logits.
Per chunk of ``C`` rows (the cuBLAS path's chunk, :func:`rlkernels.triton.linear._chunk_rows`,
the last chunk zero-padded so every GEMM has the same shape whatever N: batch invariant):

1. ``y = h_c W^T (+ b)`` through ``torch.mm`` (cuBLAS on a GPU; GEMM 1), fp32 (fp64 for fp64);
2. the vocabulary forward kernel on ``y``: ``logp``, entropy, row statistics;
3. ``g_lp = c_t dL_t/dlogp_t`` and ``g_H = -entropy_coef c_t`` of the chunk's tokens: the
   policy backward kernel on the chunk as a ``[1, C]`` batch with every aggregation weight
   1, times ``c_t`` (:func:`rlkernels.reference.policy.aggregate_weights` of the whole mask
   and normalizer, formed once before the loop: the mask gives it up front, no host sync);
4. the vocabulary backward kernel writes ``d z`` over ``y`` in place (rounded to the head
   precision's ``d z`` dtype, bf16 for bf16 inputs, into a second ``[C, V]`` buffer);
5. ``d hidden_c = d z_c W`` (GEMM 2) and ``d W += d z_c^T h_c`` (GEMM 3) into an fp32 ``[V,
   H]`` accumulator (fp64 for fp64), ``d b += sum_rows d z_c`` (fp32).

After the loop the policy forward kernel gives the loss and metrics from the whole ``[B, T]``
log-probs (the same kernels and bits as the cuBLAS path's forward). Memory (bytes, extra to
the inputs and the returned gradients): ``4 C V`` (the logits / ``d z`` chunk) ``+ 2 C V``
(bf16 ``d z``, bf16 inputs or ``head_precision="bf16"``) ``+ (2|4) C H`` (the hidden chunk)
``+ 4 C H`` (``d hidden`` of the chunk) ``+ 4 V H`` (the ``d W`` accumulator; with fp32
weights it is the returned gradient itself) ``+ 4 V`` ``+ O(N)``; with a rounding head
precision also the rounded copy of ``W``. At V=151936, H=3584, C=768 (bf16): 445 + 223 + 5 +
11 MiB and 2077 MiB for ``d W``: the fp32 accumulator is the price of forming ``d W`` while
the chunks stream by (the four-GEMM path writes each ``d W`` slice once, complete over the
rows). The gradients then live from the forward to the backward. Model and test:
benchmarks/NOTES.md, tests/ops/test_linear_peak_memory.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from .._fused import one_pass
from .._policy_options import PolicyOptions
from ..reference.policy import aggregate_weights
from . import vocab as _vocab
from ._common import compute_dtype, device_guard
from .grpo import grpo_loss_gif_scale_
from .linear import _chunk_rows, _head_precision, _mm, _round_operand, _tf32
from .policy import policy_loss_backward, policy_loss_forward

Tensor = torch.Tensor

def linear_grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place (``d hidden [N, H]``, ``d W [V, H]``, ``d b [V]``): the grpo_loss
    gif kernel, which takes any ``[rows, cols]`` buffer (a 1-d one as one row)."""
    grpo_loss_gif_scale_(grad, g)


def _per_token(x: Optional[Tensor], b: int, t: int) -> Optional[Tensor]:
    """``x`` (``[B]`` or ``[B, T]``) as ``[B * T]``, one value per token."""
    if x is None:
        return None
    return (x[:, None].expand(b, t) if x.dim() == 1 else x.expand(b, t)).reshape(-1)


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with exact products and ``acc``'s (fp32 / fp64) accumulation: bf16 /
    fp16 operands go to cuBLAS as they are (``out_dtype``), anything else through ``acc``'s
    dtype."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        try:  # cuBLAS with beta = 1 into the fp32 accumulator (not yet run on a GPU here)
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # a build without addmm's out_dtype: convert
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_grpo_loss_gif_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                                 mask: Tensor, normalizer: Optional[Tensor],
                                 ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                                 temperature: float, o: PolicyOptions,
                                 head_precision: Optional[str] = None,
                                 rows: Optional[Tensor] = None, need_hidden: bool = True,
                                 need_weight: bool = True, need_bias: bool = True, *,
                                 chunk_rows: Optional[int] = None):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [N, 3], d hidden, d weight,
    d bias)`` for an upstream gradient of 1 (see the module docstring); ``d bias`` (and a
    gradient not needed) is an empty tensor. Requires :func:`one_pass` (``o``). ``rows``: only
    those flat rows go through the GEMMs (gathered first; the caller has zeroed ``mask``
    elsewhere); ``chunk_rows`` overrides the chunk (tests)."""
    if not one_pass(o):
        raise ValueError(f"linear_grpo_loss_gif_forward: loss={o.loss!r} with ratio_level="
                         f"{o.ratio_level!r} needs the whole batch for its per-token "
                         f"gradient (use the composition of rlkernels/_fused.py)")
    b, t = tokens.shape
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    prec = _head_precision(hidden.dtype, head_precision)
    dev = hidden.device
    need_bias = need_bias and bias is not None
    # per-token values, flat; c_t: the aggregation weight of each token for d loss = 1
    m = mask.to(cdt)
    c_all = aggregate_weights(m, o.agg, normalizer).reshape(-1)
    flat = dict(tok=tokens.reshape(-1), old=old_logp.reshape(-1),
                adv=_per_token(advantages, b, t), c=c_all,
                ref=None if ref_logp is None else ref_logp.reshape(-1),
                isw=_per_token(is_weights, b, t))
    h_rows = hidden
    if rows is not None:
        flat = {k: None if v is None else v.index_select(0, rows) for k, v in flat.items()}
        h_rows = hidden.index_select(0, rows)
    r_all = h_rows.shape[0]
    logp_r = hidden.new_zeros(r_all, dtype=cdt)
    ent_r = hidden.new_zeros(r_all, dtype=cdt)
    stats_r = hidden.new_zeros(r_all, 3, dtype=cdt)
    grad_h = (torch.empty((r_all, dim), dtype=hidden.dtype, device=dev) if need_hidden
              else hidden.new_empty(0))
    dw = torch.zeros((vocab, dim), dtype=cdt, device=dev) if need_weight else None
    db = torch.zeros(vocab, dtype=cdt, device=dev) if need_bias else None
    # the chunk loop's policy backward: the chunk as one [1, C] sequence, every token's
    # weight 1 (mask of ones, normalizer 1, token-mean); c_t multiplies afterwards
    o_tok = replace(o, agg="token-mean")
    one = torch.ones((), dtype=cdt, device=dev)
    with_ent = o.entropy_coef != 0.0
    c = _chunk_rows(vocab, chunk_rows)
    if r_all:
        w_op = _round_operand(weight, prec)
        w_t = w_op.t()
        b_c = None if bias is None else bias.to(cdt)
        hbuf = torch.zeros((c, dim), dtype=w_op.dtype, device=dev)
        y = torch.empty((c, vocab), dtype=cdt, device=dev)
        dzt = prec.dz_dtype
        dz = y if dzt == cdt else torch.empty((c, vocab), dtype=dzt, device=dev)
        dh = torch.empty((c, dim), dtype=cdt, device=dev) if need_hidden else None
        ones = torch.ones((1, c), dtype=torch.bool, device=dev)
        live = (flat["tok"] != -100)[:, None]
        h_in = _round_operand(h_rows, prec)
        with _tf32(head_precision == "tf32", dev), device_guard(hidden):
            for r0 in range(0, r_all, c):
                cnt = min(c, r_all - r0)
                sl = slice(r0, r0 + cnt)
                # padding rows zeroed (NaN there is harmless), rows past the end zero
                hbuf[:cnt] = torch.where(live[sl], h_in[sl], 0)
                if cnt < c:
                    hbuf[cnt:] = 0
                _mm(hbuf, w_t, cdt, out=y)                                      # GEMM 1
                if b_c is not None:
                    y += b_c
                tok = flat["tok"][sl]
                lp, en, st = _vocab.token_logprobs_forward(y[:cnt], tok, temperature, -100,
                                                           True)
                logp_r[sl], ent_r[sl], stats_r[sl] = lp, en, st

                def rows2(x):
                    return None if x is None else x[sl].view(1, cnt)

                g, _ = policy_loss_backward(one, lp.view(1, cnt), rows2(flat["old"]),
                                            rows2(flat["adv"]), ones[:, :cnt], one,
                                            rows2(flat["ref"]), None, rows2(flat["isw"]),
                                            o_tok)
                cw = flat["c"][sl]
                live_c = cw != 0
                g_lp = torch.where(live_c, cw * g.view(cnt).to(cw.dtype), 0.0).to(lp.dtype)
                g_h = (torch.where(live_c, -o.entropy_coef * cw, 0.0).to(en.dtype)
                       if with_ent else None)
                _vocab.token_logprobs_backward(g_lp, g_h, y[:cnt], tok, st, temperature,
                                               -100, out=y[:cnt])
                if cnt < c:
                    y[cnt:] = 0  # rows past the end: out of d W's and d b's sums
                if db is not None:
                    db += y.sum(0)
                if dz is not y:
                    dz.copy_(y)  # d z in the head precision's dtype (bf16: tensor cores)
                if dh is not None and dim:
                    _mm(dz, w_op, cdt, out=dh)                                  # GEMM 2
                    grad_h[sl] = dh[:cnt]
                if dw is not None and dim:
                    _acc_mm(dw, dz.t(), hbuf)                                   # GEMM 3
    if rows is not None:
        logp_r, ent_r, stats_r = (
            x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, rows, x)
            for x in (logp_r, ent_r, stats_r))
        if need_hidden:
            grad_h = grad_h.new_zeros(n, dim).index_copy_(0, rows, grad_h)
    if need_hidden and r_all == 0:
        grad_h = torch.zeros_like(hidden)
    logp, ent = logp_r.view(b, t), ent_r.view(b, t)
    loss, metrics = policy_loss_forward(logp, old_logp, advantages, mask, normalizer, ref_logp,
                                        ent, is_weights, o)
    # (fresh empty tensors: a custom op's outputs may not alias one another)
    grad_w = weight.new_empty(0) if dw is None else dw.to(weight.dtype)
    grad_b = weight.new_empty(0) if db is None else db.to(bias.dtype)
    return loss, metrics, logp, ent, stats_r, grad_h, grad_w, grad_b
