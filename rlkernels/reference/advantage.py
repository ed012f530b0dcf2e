"""Reference kernels of the advantage ops (rewards in), readable PyTorch.

* :func:`group_advantages_forward` normalizes each reward against the other rewards of its
  group (GRPO, Dr. GRPO, RLOO, batch-std). It is the ``torch`` backend of the
  ``rlkernels::group_advantages`` custom op.
* :func:`gae` and :func:`discounted_returns` (Python loops over ``T``) are the ``torch``
  backend of the ``rlkernels::gae`` / ``rlkernels::discounted_returns`` custom ops, under
  the registry names :func:`gae_forward` and :func:`discounted_returns_forward`.
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

METHODS = ("grpo", "dr_grpo", "rloo", "batch_std")


# ------------------------------------------------------------------------- group advantages

def _segment_sums(lengths: Tensor) -> Callable[[Tensor], Tensor]:
    """``values [B] (in group order) -> per-group sums``, summing each group sequentially.

    ``unsafe=True`` skips ``segment_reduce``'s own validation of ``lengths`` (it would read the
    data back to the host); the lengths are built here and always valid.
    """
    return lambda v: torch.segment_reduce(v, "sum", lengths=lengths, unsafe=True)


def _grouped(x: Tensor, n: Tensor, group_sum: Callable[[Tensor], Tensor],
             expand: Callable[[Tensor], Tensor], method: str, eps: float, unbiased: bool,
             batch_std: Optional[Tensor]) -> Tensor:
    """Advantages of ``x [B]`` laid out in group order.

    ``n [B]`` is the size of each element's group, ``group_sum`` reduces a ``[B]`` tensor to
    per-group sums and ``expand`` broadcasts per-group values back to ``[B]``.
    """
    total = expand(group_sum(x))
    if method == "rloo":
        # baseline = mean of the other members of the group
        adv = x - (total - x) / (n - 1)
    else:
        dev = x - total / n
        if method == "dr_grpo":
            adv = dev
        elif method == "grpo":
            # two-pass variance: sum of squared deviations from the group mean
            ss = expand(group_sum(dev * dev))
            std = torch.sqrt(ss / ((n - 1) if unbiased else n))
            adv = dev / (std + eps)
        else:  # batch_std
            adv = dev / (batch_std + eps)
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


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool) -> Tensor:
    """Advantages ``[B]`` of rewards ``[B]``, grouped by ``group_index`` (int ids ``[B]``) or,
    when it is ``None``, in contiguous groups of ``group_size`` members.

    fp32 output and math (fp64 for fp64 rewards). See
    :func:`rlkernels.ops.advantage.group_advantages` for the formulas.
    """
    cdt = compute_dtype(rewards.dtype)
    x = rewards.to(cdt).reshape(-1)
    b = x.numel()
    if b == 0:
        return x.new_empty(0)
    batch_std = _batch_std(x, unbiased) if method == "batch_std" else None

    if group_index is None:
        groups = b // group_size
        lengths = torch.full((groups,), group_size, dtype=torch.int64, device=x.device)
        n = torch.full((b,), group_size, dtype=cdt, device=x.device)

        def expand(per_group: Tensor) -> Tensor:
            return per_group.view(groups, 1).expand(groups, group_size).reshape(b)

        return _grouped(x, n, _segment_sums(lengths), expand, method, eps, unbiased,
                        batch_std)

    # Arbitrary ids: sort (stable: members keep their order), segment, reduce, scatter back.
    sorted_ids, perm = torch.sort(group_index.reshape(-1), stable=True)
    changed = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    seg = torch.cat([changed.new_zeros(1), torch.cumsum(changed, 0)])  # [B], values in [0, B)
    # Segment lengths for B possible segments (the unused tail has length 0); integer
    # scatter_add is exact and deterministic, and the shape does not depend on the data.
    counts = torch.zeros(b, dtype=torch.int64, device=x.device).scatter_add_(
        0, seg, torch.ones_like(seg))
    n = counts.gather(0, seg).to(cdt)

    def expand_sorted(per_group: Tensor) -> Tensor:
        return per_group.gather(0, seg)

    adv_sorted = _grouped(x.gather(0, perm), n, _segment_sums(counts), expand_sorted, method,
                          eps, unbiased, batch_std)
    return torch.empty_like(adv_sorted).scatter_(0, perm, adv_sorted)


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


# The registry (rlkernels/backends.py) finds an op's kernel of a backend as ``<op>_forward``.
gae_forward = gae
discounted_returns_forward = discounted_returns
