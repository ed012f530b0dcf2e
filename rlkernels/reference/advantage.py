"""Reference kernels of the advantage ops (rewards in), readable PyTorch.

* :func:`group_advantages_forward` normalizes each reward against the other rewards of its
  group (GRPO, Dr. GRPO, RLOO, batch-std, and verl's OPO, GPG, GRPO Pass@k,
  REINFORCE++-baseline and GDPO, the last two followed by a token-weighted batch whitening).
  It is the ``torch`` backend of the ``rlkernels::group_advantages`` custom op.
* :func:`gae` and :func:`discounted_returns` (Python loops over ``T``) are the ``torch``
  backend of the ``rlkernels::gae`` / ``rlkernels::discounted_returns`` custom ops, under
  the registry names :func:`gae_forward` and :func:`discounted_returns_forward`;
  :func:`discounted_advantages` (ReMax's baseline, REINFORCE++'s whitening) that of
  ``rlkernels::discounted_advantages``.
* :func:`masked_whiten_forward` / :func:`masked_whiten_backward` are the ``torch`` backend of
  ``rlkernels::masked_whiten`` (the backward formula written out).

Everything is computed in fp32 (fp64 for fp64 inputs), without host synchronisations and
without data-dependent shapes, so the code is CUDA-graph capturable.

Grouping. Both ways of describing groups go through the same arithmetic:

* contiguous groups (``group_size = S``): the rewards are already in group order; group ``g``
  is the slice ``[g S, (g + 1) S)`` (``view(G, S)``);
* arbitrary ids (``group_index``): a stable sort brings each group together while keeping the
  original order of its members; segment ids are the running count of "id changed"; per-group
  sums come from ``torch.segment_reduce``; results are scattered back to the original order.

Per-group sums are sequential sums over the members in their original order (that is what
``segment_reduce`` does), so a group's result is bit-identical in both paths, whatever ids
it has, wherever it sits in the batch and whatever other groups are in the call.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from . import compute_dtype

Tensor = torch.Tensor

METHODS = ("grpo", "dr_grpo", "rloo", "batch_std", "opo", "gpg", "grpo_passk",
           "reinforce_plus_plus_baseline", "gdpo", "grpo_vectorized", "rloo_vectorized")
# verl's names of the same math: a method that is one of these is computed as its target
ALIASES = {"grpo_vectorized": "grpo", "rloo_vectorized": "rloo"}
# methods that read the response mask (token counts) / whiten over the batch afterwards
MASK_METHODS = ("opo", "reinforce_plus_plus_baseline", "gdpo")
WHITEN_METHODS = ("reinforce_plus_plus_baseline", "gdpo")
# methods with a group std that norm_by_std=False removes
STD_METHODS = ("grpo", "grpo_vectorized", "grpo_passk", "gdpo")


# ------------------------------------------------------------------------- group advantages

def _segment_sums(lengths: Tensor, reduce: str = "sum") -> Callable[[Tensor], Tensor]:
    """``values [B] (in group order) -> per-group sums``, summing each group sequentially
    (``reduce="max"``: per-group maxima).

    ``unsafe=True`` skips ``segment_reduce``'s own validation of ``lengths`` (it would read the
    data back to the host); the lengths are built here and always valid.
    """
    return lambda v: torch.segment_reduce(v, reduce, lengths=lengths, unsafe=True)


def _grouped(x: Tensor, n: Tensor, group_sum: Callable[[Tensor], Tensor],
             expand: Callable[[Tensor], Tensor], method: str, eps: float, unbiased: bool,
             batch_std: Optional[Tensor], lengths: Optional[Tensor] = None,
             group_max: Optional[Callable[[Tensor], Tensor]] = None,
             norm_by_std: bool = True, gpg_scale: Optional[Tensor] = None) -> Tensor:
    """Advantages of ``x [B]`` laid out in group order.

    ``n [B]`` is the size of each element's group, ``group_sum`` reduces a ``[B]`` tensor to
    per-group sums and ``expand`` broadcasts per-group values back to ``[B]``. ``lengths``
    (valid tokens per response) for ``opo``, ``group_max`` for ``grpo_passk``,
    ``gpg_scale = B / max(#nonzero rewards, 1)`` for ``gpg``.
    """
    total = expand(group_sum(x))
    dev = x - total / n

    def group_std() -> Tensor:
        # two-pass variance: sum of squared deviations from the group mean
        ss = expand(group_sum(dev * dev))
        return torch.sqrt(ss / ((n - 1) if unbiased else n))

    if method == "rloo":
        # baseline = mean of the other members of the group
        adv = x - (total - x) / (n - 1)
    elif method in ("dr_grpo", "reinforce_plus_plus_baseline"):
        adv = dev
    elif method == "grpo":
        adv = dev / (group_std() + eps) if norm_by_std else dev
    elif method == "batch_std":
        adv = dev / (batch_std + eps)
    elif method == "gpg":
        adv = gpg_scale * dev
    elif method == "opo":
        # baseline = the group mean weighted by response length; no valid token in the whole
        # group: no baseline (advantage r - r, as a group of one)
        sum_len = expand(group_sum(lengths))
        baseline = expand(group_sum(lengths * x)) / sum_len
        adv = torch.where(sum_len > 0, x - baseline, x - x)
    elif method == "grpo_passk":
        # only the best member gets (max - second max); a tie for the max gives 0 to all
        top = expand(group_max(x))
        is_top = x == top
        n_top = expand(group_sum(is_top.to(x.dtype)))
        second = expand(group_max(torch.where(is_top, float("-inf"), x)))
        gap = top - second
        if norm_by_std:
            gap = gap / (group_std() + eps)
        adv = torch.where(is_top & (n_top == 1), gap, torch.zeros_like(x))
        adv = adv + (total - total)  # a NaN (or inf) reward makes its whole group NaN
    else:
        raise ValueError(f"method: unknown {method!r}")
    # A group of one member has no baseline: its advantage is r - r (exactly 0 for a finite
    # reward, NaN for a NaN one), for every method.
    return torch.where(n > 1, adv, x - x)


def _batch_std(x: Tensor, unbiased: bool) -> Tensor:
    """Standard deviation of the whole batch (two-pass), a 0-dim tensor."""
    b = x.numel()
    mean = x.sum() / b
    dev = x - mean
    denom = b - 1 if unbiased else b
    return torch.sqrt((dev * dev).sum() / max(denom, 1))


def _whiten_rows(pre: Tensor, lengths: Tensor, eps: float, unbiased: bool) -> Tensor:
    """verl's ``masked_whiten`` of the ``[B, T]`` tensor ``pre[:, None] * mask`` over its
    valid tokens, read at one valid token per row: each row weighs its number of valid tokens
    ``L``. ``c = sum L``, ``mean = sum L pre / max(c, 1)``,
    ``var = sum L (pre - mean)^2 / max(c - 1, 1)`` (``max(c, 1)`` when not ``unbiased``),
    ``out = (pre - mean) / sqrt(var + eps)``."""
    used = lengths > 0
    count = lengths.sum()
    mean = torch.where(used, lengths * pre, 0.0).sum() / torch.clamp(count, min=1)
    dev = pre - mean
    denom = torch.clamp(count - 1 if unbiased else count, min=1)
    var = torch.where(used, lengths * dev * dev, 0.0).sum() / denom
    return dev * torch.rsqrt(var + eps)


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool,
                             mask: Optional[Tensor] = None,
                             reward_weights: Optional[Tensor] = None, norm_by_std: bool = True,
                             whiten_eps: float = 1e-8) -> Tensor:
    """Advantages ``[B]`` of rewards ``[B]`` (``[B, K]`` reward components for ``gdpo``),
    grouped by ``group_index`` (int ids ``[B]``) or, when it is ``None``, in contiguous groups
    of ``group_size`` members.

    fp32 output and math (fp64 for fp64 rewards). See
    :func:`rlkernels.ops.advantage.group_advantages` for the formulas.
    """
    method = ALIASES.get(method, method)
    cdt = compute_dtype(rewards.dtype)
    if method == "gdpo":
        # one GRPO advantage per reward component, weighted and summed in component order,
        # then whitened over the batch
        comps = rewards.to(cdt)
        comps = comps if comps.dim() == 2 else comps.reshape(-1, 1)
        w = (torch.ones(comps.shape[1], dtype=cdt, device=comps.device)
             if reward_weights is None else reward_weights.to(cdt))
        pre = torch.zeros(comps.shape[0], dtype=cdt, device=comps.device)
        for k in range(comps.shape[1]):
            pre = pre + w[k] * group_advantages_forward(
                comps[:, k], group_index, group_size, "grpo", eps, unbiased,
                norm_by_std=norm_by_std)
        return _whiten_rows(pre, _lengths(mask, cdt), whiten_eps, unbiased)
    x = rewards.to(cdt).reshape(-1)
    b = x.numel()
    if b == 0:
        return x.new_empty(0)
    batch_std = _batch_std(x, unbiased) if method == "batch_std" else None
    lengths = _lengths(mask, cdt) if method in MASK_METHODS else None
    # gpg: alpha = B / (number of non-zero rewards in the batch), at least 1 in the divisor
    gpg_scale = b / torch.clamp((x != 0).sum(), min=1).to(cdt) if method == "gpg" else None
    opts = dict(method=method, eps=eps, unbiased=unbiased, batch_std=batch_std,
                norm_by_std=norm_by_std, gpg_scale=gpg_scale)

    if group_index is None:
        groups = b // group_size
        seg_lengths = torch.full((groups,), group_size, dtype=torch.int64, device=x.device)
        n = torch.full((b,), group_size, dtype=cdt, device=x.device)

        def expand(per_group: Tensor) -> Tensor:
            return per_group.view(groups, 1).expand(groups, group_size).reshape(b)

        adv = _grouped(x, n, _segment_sums(seg_lengths), expand, lengths=lengths,
                       group_max=_segment_sums(seg_lengths, "max"), **opts)
    else:
        # Arbitrary ids: sort (stable: members keep their order), segment, reduce, scatter
        # back.
        sorted_ids, perm = torch.sort(group_index.reshape(-1), stable=True)
        changed = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
        seg = torch.cat([changed.new_zeros(1), torch.cumsum(changed, 0)])  # [B], in [0, B)
        # Segment lengths for B possible segments (the unused tail has length 0); integer
        # scatter_add is exact and deterministic, and the shape does not depend on the data.
        counts = torch.zeros(b, dtype=torch.int64, device=x.device).scatter_add_(
            0, seg, torch.ones_like(seg))
        n = counts.gather(0, seg).to(cdt)

        def expand_sorted(per_group: Tensor) -> Tensor:
            return per_group.gather(0, seg)

        adv_sorted = _grouped(x.gather(0, perm), n, _segment_sums(counts), expand_sorted,
                              lengths=None if lengths is None else lengths.gather(0, perm),
                              group_max=_segment_sums(counts, "max"), **opts)
        adv = torch.empty_like(adv_sorted).scatter_(0, perm, adv_sorted)
    if method in WHITEN_METHODS:
        adv = _whiten_rows(adv, lengths, whiten_eps, unbiased)
    return adv


def _lengths(mask: Tensor, cdt: torch.dtype) -> Tensor:
    """Valid tokens per response: the non-zero entries of each row of ``mask [B, T]``."""
    return (mask != 0).sum(-1).to(cdt)


# ------------------------------------------------------------------------------- whitening

def masked_whiten_forward(values: Tensor, mask: Tensor, shift_mean: bool, eps: float,
                          unbiased: bool) -> Tuple[Tensor, Tensor]:
    """``(v - mean) * rsqrt(var + eps)`` (``+ mean`` when not ``shift_mean``) over the masked
    elements of the whole tensor; every position is transformed.

    With ``w = mask`` (as weights) and ``c = sum(w)``: ``mean = sum(w v) / max(c, 1)``,
    ``var = sum(w (v - mean)^2) / max(c - 1, 1)`` (``max(c, 1)`` when not ``unbiased``).
    Positions where ``mask == 0`` take no part in the statistics (a NaN there does not leak).
    Returns ``(out, stats)``, ``stats = (c, mean, rstd, S)`` with ``S = sum(w (v - mean))``
    over the valid positions, for :func:`masked_whiten_backward`.
    """
    cdt = compute_dtype(values.dtype)
    v = values.to(cdt)
    valid = mask != 0
    w = torch.where(valid, mask.to(cdt), 0.0)
    count = w.sum()
    mean = torch.where(valid, w * v, 0.0).sum() / torch.clamp(count, min=1)
    dev = v - mean
    denom = torch.clamp(count - 1 if unbiased else count, min=1)
    var = torch.where(valid, w * dev * dev, 0.0).sum() / denom
    rstd = torch.rsqrt(var + eps)
    out = dev * rstd
    out = out + mean if not shift_mean else out
    stats = torch.stack([count, mean, rstd, torch.where(valid, w * dev, 0.0).sum()])
    return out, stats


def masked_whiten_backward(grad_out: Tensor, values: Tensor, mask: Tensor, stats: Tensor,
                           shift_mean: bool, unbiased: bool) -> Tensor:
    """The gradient of :func:`masked_whiten_forward`'s ``out`` w.r.t. ``values``.

    With ``w`` the mask weights at valid positions (0 elsewhere), ``c1 = max(count, 1)``,
    ``den = max(count - 1, 1)`` (``max(count, 1)`` when not ``unbiased``), ``d = v - mean``,
    ``r = rstd``, ``S = sum(w d)`` (0 unless ``0 < count < 1``), and over every position
    ``G = sum(g)``, ``D = sum(g d)`` (terms with ``g = 0`` count 0, so a NaN value at a masked
    position whose output gets no gradient leaves the other gradients finite)::

        grad_j = g_j r + (w_j / c1) G ([not shift_mean] - r) - r^3 D (w_j d_j - S w_j / c1) / den

    (``d out_i / d mean = -r`` plus 1 without ``shift_mean``; ``d var / d v_j =
    2 (w_j d_j - S w_j / c1) / den``; ``d r / d var = -r^3 / 2``.)
    """
    cdt = stats.dtype
    count, mean, rstd, s = stats.unbind()
    g = grad_out.to(cdt)
    dev = values.to(cdt) - mean
    valid = mask != 0
    w = torch.where(valid, mask.to(cdt), 0.0)
    c1 = torch.clamp(count, min=1)
    denom = torch.clamp(count - 1 if unbiased else count, min=1)
    dmean = w / c1
    k_mean = g.sum() * ((0.0 if shift_mean else 1.0) - rstd)
    # a position with g = 0 adds nothing, even where its value is NaN (a masked position)
    k_var = -rstd ** 3 * torch.where(g != 0, g * dev, 0.0).sum()
    dvar = torch.where(valid, (w * dev - s * dmean) / denom, 0.0)
    return g * rstd + dmean * k_mean + dvar * k_var


# ----------------------------------------------------------------------- GAE and returns

def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation over ``[B, T]``, a reverse scan over ``T``.

    Masked positions (``mask == 0``, e.g. tool/observation tokens between turns, or padding)
    are skipped: the scan carries its state across them unchanged, so the next valid position
    bootstraps from the next *valid* value. At a valid position ``t``::

        delta     = r_t + gamma * nextvalue - v_t
        lastgae   = delta + gamma * lam * lastgae
        nextvalue = v_t

    ``advantages_t = lastgae``, ``returns = advantages + values``; both are exactly 0 at masked
    positions. The scan starts from ``nextvalue = lastgae = 0`` after the last position.
    """
    cdt = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    r = rewards.to(cdt).t()  # [T, B]: each step reads one contiguous row
    v = values.to(cdt).t()
    valid = (mask != 0).t()
    steps, batch = r.shape
    adv = torch.zeros((steps, batch), dtype=cdt, device=r.device)
    nextvalue = torch.zeros(batch, dtype=cdt, device=r.device)
    lastgae = torch.zeros(batch, dtype=cdt, device=r.device)
    for t in reversed(range(steps)):
        delta = r[t] + gamma * nextvalue - v[t]
        candidate = delta + (gamma * lam) * lastgae
        nextvalue = torch.where(valid[t], v[t], nextvalue)
        lastgae = torch.where(valid[t], candidate, lastgae)
        adv[t] = lastgae
    zero = torch.zeros((), dtype=cdt, device=r.device)
    returns = torch.where(valid, adv + v, zero)
    adv = torch.where(valid, adv, zero)
    return adv.t().contiguous(), returns.t().contiguous()


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t'}`` where ``t'`` is the next valid position after ``t``
    (masked positions are skipped and output exactly 0), ``G = 0`` after the last one."""
    cdt = compute_dtype(rewards.dtype)
    r = rewards.to(cdt).t()
    valid = (mask != 0).t()
    steps, batch = r.shape
    out = torch.zeros((steps, batch), dtype=cdt, device=r.device)
    ret = torch.zeros(batch, dtype=cdt, device=r.device)
    zero = torch.zeros((), dtype=cdt, device=r.device)
    for t in reversed(range(steps)):
        ret = torch.where(valid[t], r[t] + gamma * ret, ret)
        out[t] = torch.where(valid[t], ret, zero)
    return out.t().contiguous()


def discounted_advantages(rewards: Tensor, mask: Tensor, baseline: Optional[Tensor],
                          gamma: float, whiten: bool, whiten_eps: float, unbiased: bool
                          ) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` ``[B, T]``: ``returns`` as :func:`discounted_returns`;
    at valid positions ``a = G - baseline`` (ReMax: ``baseline [B]``, the reward of the
    greedy response; 0 without one), whitened over every valid position of the batch with
    ``whiten`` (REINFORCE++: ``(a - mean) / sqrt(var + whiten_eps)``, ``var`` with Bessel's
    correction when ``unbiased``); both exactly 0 at masked positions."""
    returns = discounted_returns(rewards, mask, gamma)
    valid = mask != 0
    adv = returns
    if baseline is not None:
        adv = adv - baseline.to(returns.dtype).reshape(-1, 1)
    if whiten:
        adv = masked_whiten_forward(adv, valid, True, whiten_eps, unbiased)[0]
    adv = torch.where(valid, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    return adv, returns


# The registry (rlkernels/backends.py) finds an op's kernel of a backend as ``<op>_forward``.
gae_forward = gae
discounted_returns_forward = discounted_returns
discounted_advantages_forward = discounted_advantages
