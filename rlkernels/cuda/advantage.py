"""Launchers for csrc/advantage.cu, with the signatures and outputs of
:mod:`rlkernels.reference.advantage`:

* ``group_advantages_forward``: one warp per group, members in their original order:
  deterministic, and bit-identical for contiguous groups and ``group_index``;
  verl's opo / gpg / grpo_passk / reinforce_plus_plus_baseline / gdpo go to
  ``group_estimators_forward`` (same layout, plus the batch pass they need);
* ``gae_forward``, ``discounted_returns_forward``: reverse scans over ``T``, one warp per row;
  ``discounted_advantages_forward``: the same scan writing ``G - baseline`` too, then an
  optional batch whitening (ReMax / REINFORCE++);
* ``masked_whiten_forward`` / ``masked_whiten_backward``: whole-tensor masked statistics with
  deterministic two-stage sums (no atomics).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _codes
from ._common import (DTYPE_CODES, FLOAT_DTYPES, INDEX_DTYPES, compute_dtype, expect, extension,
                      matrix, ptr, rows, stream_of)

Tensor = torch.Tensor

_METHODS = _codes.ADVANTAGE_METHODS


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool,
                             mask: Optional[Tensor] = None,
                             reward_weights: Optional[Tensor] = None, norm_by_std: bool = True,
                             whiten_eps: float = 1e-8) -> Tensor:
    """Advantages ``[B]`` (fp32, fp64 for fp64 rewards). ``group_index=None``: contiguous
    groups of ``group_size``; else a stable sort of the ids (torch, on the device, no host
    sync) gives each group's members in their original order."""
    code = _METHODS[method]
    if code == _METHODS["grpo"] and not norm_by_std:
        code = _METHODS["dr_grpo"]  # grpo without the std is dr_grpo
    if code > _METHODS["batch_std"]:
        return _estimators(rewards, group_index, group_size, code, eps, unbiased, mask,
                           reward_weights, norm_by_std, whiten_eps)
    C = extension()
    x = expect("rewards", rewards, FLOAT_DTYPES, ndim=1)
    b = x.shape[0]
    cdt = compute_dtype(x.dtype)
    out = torch.empty(b, dtype=cdt, device=x.device)
    if group_index is not None:
        expect("group_index", group_index, INDEX_DTYPES, shape=(b,), like=x)
    if b == 0:
        return out
    perm, starts, slots = _slots(b, group_index, group_size, x.device)
    workspace = torch.empty(1, dtype=cdt, device=x.device)
    with torch.cuda.device(x.device):
        C.group_advantages_forward(
            rewards=rows(C, x), perm=ptr(perm), starts=ptr(starts), out=out.data_ptr(),
            workspace=workspace.data_ptr(), b=b,
            group_size=group_size if group_index is None else 0, slots=slots,
            dtype=DTYPE_CODES[x.dtype], method=code, unbiased=bool(unbiased),
            eps=float(eps), stream=stream_of(x))
    return out


def _slots(b: int, group_index: Optional[Tensor], group_size: int, device):
    """``(perm, starts, slots)`` of the group kernels: ``(None, None, b / group_size)`` for
    contiguous groups; else a stable sort of the ids (torch, on the device, no host sync)
    gives each group's members in their original order, ``starts`` the first sorted position
    of each run of equal ids (``b`` past the last run) and there are ``b`` slots."""
    if group_index is None:
        # group_size >= 1 dividing b is checked in C++ (a group never reads past b)
        return None, None, b // max(int(group_size), 1)
    sorted_ids, perm = torch.sort(group_index, stable=True)
    new_run = torch.ones(b, dtype=torch.int64, device=device)
    new_run[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    run = torch.cumsum(new_run, 0) - 1  # run number of each sorted position
    starts = torch.searchsorted(run, torch.arange(b + 1, device=device))
    return perm.to(torch.int64).contiguous(), starts.to(torch.int64).contiguous(), b


_WHITENED = (_METHODS["reinforce_plus_plus_baseline"], _METHODS["gdpo"])


def _estimators(rewards: Tensor, group_index: Optional[Tensor], group_size: int, code: int,
                eps: float, unbiased: bool, mask: Optional[Tensor],
                reward_weights: Optional[Tensor], norm_by_std: bool,
                whiten_eps: float) -> Tensor:
    """verl's opo / gpg / grpo_passk / reinforce_plus_plus_baseline / gdpo: one launch of
    ``group_estimators_forward`` (+ the batch pass of gpg's alpha or of the whitening, in the
    same C++ call). ``rewards [B]`` or ``[B, K]`` (gdpo), ``mask [B, T]`` any dtype (read as
    non-zero = valid token)."""
    C = extension()
    x = expect("rewards", rewards, FLOAT_DTYPES)
    x2 = x if x.dim() == 2 else x.reshape(-1, 1)
    b, k = x2.shape
    cdt = compute_dtype(x.dtype)
    out = torch.empty(b, dtype=cdt, device=x.device)
    if group_index is not None:
        expect("group_index", group_index, INDEX_DTYPES, shape=(b,), like=x)
    valid = None
    if mask is not None:
        valid = _valid_u8(expect("mask", mask, MASK_DTYPES, ndim=2, like=x))
        if valid.shape[0] != b:
            raise ValueError(f"mask: expected {b} rows, got shape {tuple(valid.shape)}")
    if b == 0:
        return out
    perm, starts, slots = _slots(b, group_index, group_size, x.device)
    weights = None
    if code == _METHODS["gdpo"]:
        weights = (torch.ones(k, dtype=cdt, device=x.device) if reward_weights is None
                   else expect("reward_weights", reward_weights, FLOAT_DTYPES, shape=(k,),
                               like=x).to(cdt).contiguous())
    elif k != 1:
        raise ValueError(f"rewards: expected [B] (reward components are for gdpo), got shape "
                         f"{tuple(x.shape)}")
    workspace = torch.empty(3 * b if code in _WHITENED else 1, dtype=cdt, device=x.device)
    with torch.cuda.device(x.device):
        C.group_estimators_forward(
            rewards=matrix(C, x2), perm=ptr(perm), starts=ptr(starts), mask=matrix(C, valid),
            weights=ptr(weights), out=out.data_ptr(), workspace=workspace.data_ptr(), b=b,
            k=k, t=0 if valid is None else valid.shape[1],
            group_size=group_size if group_index is None else 0, slots=slots,
            dtype=DTYPE_CODES[x.dtype], method=code, unbiased=bool(unbiased),
            norm_by_std=bool(norm_by_std), eps=float(eps), whiten_eps=float(whiten_eps),
            stream=stream_of(x))
    return out


# ===================================================================== gae, discounted returns

# Masks may be bool, integer or float (non-zero = valid), as in rlkernels/ops/advantage.py.
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               *FLOAT_DTYPES)


def _mask(name: str, mask, ref: Tensor) -> Tensor:
    return expect(name, mask, MASK_DTYPES, shape=tuple(ref.shape), like=ref)


def _valid_u8(mask: Tensor) -> Tensor:
    """``mask != 0`` as a uint8 view (strides kept; a new tensor only for non-bool masks)."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.view(torch.uint8)


def gae_forward(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
                ) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` ``[B, T]``, as :func:`rlkernels.reference.advantage.gae`:
    at a valid step ``delta = r_t + gamma * nextvalue - v_t``, ``lastgae = delta + gamma lam
    lastgae``, ``nextvalue = v_t``; masked steps are skipped (the state passes through) and
    output exactly 0; ``returns = advantages + values``. fp32 (fp64 when an input is fp64).

    Kernel: one warp per row, a reverse scan of the affine map ``L -> delta + gamma lam L``
    (and of "value at the next valid step") in chunks of 128 steps; any strides.
    """
    C = extension()
    expect("rewards", rewards, FLOAT_DTYPES, ndim=2)
    expect("values", values, FLOAT_DTYPES, shape=tuple(rewards.shape), like=rewards)
    valid = _valid_u8(_mask("mask", mask, rewards))
    g, lam = float(gamma), float(lam)
    b, steps = rewards.shape
    cdt = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    r, v = rewards, values
    if r.dtype != v.dtype:  # one storage dtype per kernel: convert the pair to the math dtype
        r, v = r.to(cdt), v.to(cdt)
    adv = torch.empty((b, steps), dtype=cdt, device=r.device)
    ret = torch.empty((b, steps), dtype=cdt, device=r.device)
    if b == 0 or steps == 0:
        return adv, ret
    with torch.cuda.device(r.device):
        C.gae_forward(rewards=matrix(C, r), values=matrix(C, v), mask=matrix(C, valid),
                      advantages=adv.data_ptr(), returns=ret.data_ptr(), b=b, t=steps,
                      dtype=DTYPE_CODES[r.dtype], gamma=g, lam=lam, stream=stream_of(r))
    return adv, ret


def discounted_returns_forward(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``[B, T]``, as :func:`rlkernels.reference.advantage.discounted_returns`:
    ``G_t = r_t + gamma G_{t'}`` with ``t'`` the next valid step, exactly 0 at masked steps.
    fp32 (fp64 for fp64 rewards). Same kernel as :func:`gae_forward` (one warp per row).
    """
    C = extension()
    expect("rewards", rewards, FLOAT_DTYPES, ndim=2)
    valid = _valid_u8(_mask("mask", mask, rewards))
    g = float(gamma)
    b, steps = rewards.shape
    out = torch.empty((b, steps), dtype=compute_dtype(rewards.dtype), device=rewards.device)
    if b == 0 or steps == 0:
        return out
    r = rewards
    with torch.cuda.device(r.device):
        C.discounted_returns_forward(rewards=matrix(C, r), mask=matrix(C, valid),
                                     out=out.data_ptr(), b=b, t=steps,
                                     dtype=DTYPE_CODES[r.dtype], gamma=g, stream=stream_of(r))
    return out


def discounted_advantages_forward(rewards: Tensor, mask: Tensor, baseline: Optional[Tensor],
                                  gamma: float, whiten: bool, whiten_eps: float,
                                  unbiased: bool) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` ``[B, T]``, as
    :func:`rlkernels.reference.advantage.discounted_advantages`: the scan of
    :func:`discounted_returns_forward` also writes ``G - baseline`` at valid steps (0 at
    masked ones) and, with ``whiten``, each row's (count, mean, M2); a second launch whitens
    over the batch. fp32 (fp64 for fp64 rewards)."""
    C = extension()
    expect("rewards", rewards, FLOAT_DTYPES, ndim=2)
    valid = _valid_u8(_mask("mask", mask, rewards))
    b, steps = rewards.shape
    cdt = compute_dtype(rewards.dtype)
    base = None
    if baseline is not None:
        base = expect("baseline", baseline, FLOAT_DTYPES, shape=(b,),
                      like=rewards).to(cdt).contiguous()
    ret = torch.empty((b, steps), dtype=cdt, device=rewards.device)
    adv = torch.empty((b, steps), dtype=cdt, device=rewards.device)
    if b == 0 or steps == 0:
        return adv, ret
    workspace = torch.empty(3 * b if whiten else 1, dtype=cdt, device=rewards.device)
    with torch.cuda.device(rewards.device):
        C.discounted_advantages_forward(
            rewards=matrix(C, rewards), mask=matrix(C, valid), baseline=ptr(base),
            advantages=adv.data_ptr(), returns=ret.data_ptr(),
            workspace=workspace.data_ptr(), b=b, t=steps, dtype=DTYPE_CODES[rewards.dtype],
            gamma=float(gamma), whiten=bool(whiten), whiten_eps=float(whiten_eps),
            unbiased=bool(unbiased), stream=stream_of(rewards))
    return adv, ret


# ============================================================================ masked_whiten

WHITEN_STATS = 4  # (count, mean, rstd, sum w (v - mean))
_WHITEN_MAX_BLOCKS = 1024  # csrc/advantage.cu kWhitenMaxBlocks
_WHITEN_PER_BLOCK = 2048   # elements per block of 256 threads before a new block is added


def _whiten_blocks(n: int) -> int:
    """Blocks of the two-stage sums: a function of ``n`` only (determinism)."""
    return max(1, min(_WHITEN_MAX_BLOCKS, -(-n // _WHITEN_PER_BLOCK)))


def _whiten_inputs(values: Tensor, mask: Tensor, cdt: torch.dtype):
    """Flat contiguous values, and the mask as (uint8 or None, weights in cdt or None)."""
    v = values.contiguous()
    if mask.dtype == torch.bool:
        return v, mask.contiguous().view(torch.uint8), None
    return v, None, mask.to(cdt).contiguous()


def masked_whiten_forward(values: Tensor, mask: Tensor, shift_mean: bool, eps: float,
                          unbiased: bool) -> Tuple[Tensor, Tensor]:
    """``(out, stats)``: ``out`` as :func:`rlkernels.reference.advantage.masked_whiten`
    (values' shape, fp32; fp64 for fp64 values) and ``stats = (c, mean, rstd, S)`` (4
    elements, same dtype) for the backward.

    With ``w = mask`` as weights (bool: 0/1; an element with ``w == 0`` takes no part, so a
    NaN there does not leak): ``c = sum w``, ``mean = sum w v / max(c, 1)``,
    ``dev = v - mean``, ``var = sum w dev^2 / max(c - 1 (unbiased) or c, 1)``,
    ``rstd = 1 / sqrt(var + eps)``, ``out = dev rstd`` (``+ mean`` when not ``shift_mean``),
    ``S = sum w dev`` (0 up to rounding when ``c >= 1``, not when ``0 < c < 1``).
    A float mask is converted to the math dtype first (an entry that underflows to 0 there
    counts as masked). Three launches, deterministic (no atomics).
    """
    C = extension()
    expect("values", values, FLOAT_DTYPES)
    _mask("mask", mask, values)
    eps = float(eps)
    cdt = compute_dtype(values.dtype)
    v, mb, mw = _whiten_inputs(values, mask, cdt)
    n = v.numel()
    blocks = _whiten_blocks(n)
    out = torch.empty(values.shape, dtype=cdt, device=values.device)
    stats = torch.empty(WHITEN_STATS, dtype=cdt, device=values.device)
    workspace = torch.empty(blocks, 4, dtype=cdt, device=values.device)
    with torch.cuda.device(values.device):
        C.masked_whiten_forward(values=v.data_ptr(), mask_u8=ptr(mb), mask_w=ptr(mw),
                                out=out.data_ptr(), stats=stats.data_ptr(),
                                workspace=workspace.data_ptr(), n=n, blocks=blocks,
                                dtype=DTYPE_CODES[v.dtype], shift_mean=bool(shift_mean),
                                eps=eps, unbiased=bool(unbiased), stream=stream_of(v))
    return out, stats


def masked_whiten_backward(grad_out: Tensor, values: Tensor, mask: Tensor, stats: Tensor,
                           shift_mean: bool, unbiased: bool) -> Tensor:
    """Gradient w.r.t. ``values`` (values' dtype) of :func:`masked_whiten_forward`, from its
    ``stats = (c, mean, r, S)``. With ``g = grad_out``, ``C1 = max(c, 1)``,
    ``D = max(c - 1 (unbiased) or c, 1)``, ``G = sum_i g_i``, ``H = sum_i g_i dev_i`` (over
    every element; a term with ``g_i = 0`` counts 0 even where ``dev_i`` is NaN) and
    ``ns = 1`` when not ``shift_mean`` (else 0)::

        grad_j = r g_j - w_j [ G (r - ns) / C1 + (r^3 H / D) (dev_j - S / C1) ]

    (the second term only where ``w_j != 0``). Derivation: ``d mean / d v_j = w_j / C1``,
    ``d var / d v_j = 2 w_j (dev_j - S / C1) / D``, ``d r / d v_j = -r^3 / 2 d var / d v_j``;
    ``c`` (so ``C1``, ``D``) does not depend on ``v``. Two launches, deterministic.
    """
    C = extension()
    expect("values", values, FLOAT_DTYPES)
    _mask("mask", mask, values)
    cdt = compute_dtype(values.dtype)
    expect("grad_out", grad_out, FLOAT_DTYPES, shape=tuple(values.shape), like=values)
    expect("stats", stats, (cdt,), shape=(WHITEN_STATS,), like=values)
    v, mb, mw = _whiten_inputs(values, mask, cdt)
    g = grad_out.to(cdt).contiguous()
    n = v.numel()
    grad = torch.empty(values.shape, dtype=values.dtype, device=values.device)
    if n == 0:
        return grad
    blocks = _whiten_blocks(n)
    workspace = torch.empty(blocks, 2, dtype=cdt, device=values.device)
    with torch.cuda.device(values.device):
        C.masked_whiten_backward(grad_out=g.data_ptr(), values=v.data_ptr(), mask_u8=ptr(mb),
                                 mask_w=ptr(mw), stats=stats.contiguous().data_ptr(),
                                 workspace=workspace.data_ptr(), grad_values=grad.data_ptr(),
                                 n=n, blocks=blocks, dtype=DTYPE_CODES[v.dtype],
                                 shift_mean=bool(shift_mean), unbiased=bool(unbiased),
                                 stream=stream_of(v))
    return grad


__all__ = ["group_advantages_forward", "gae_forward", "discounted_returns_forward",
           "discounted_advantages_forward",
           "masked_whiten_forward", "masked_whiten_backward"]
