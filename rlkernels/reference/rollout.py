"""Reference kernel of ``rollout_correction`` (rollout-vs-trainer log-prob mismatch): the
importance weights, the rejection (keep) mask and the mismatch metrics, as plain PyTorch.

Read :func:`rlkernels.ops.rollout.rollout_correction` for the contract and docs/math.md
("Rollout correction") for the formulas and their sources (verl's rollout_corr_helper, TRL's
GRPO trainer, DeepSeek-V3.2). Notation: ``m`` the mask value (bool/int -> 0/1, float masks act
as weights in every sum), ``valid = m != 0``, ``lr = old_logp - rollout_logp`` (the log of
``pi_train / pi_rollout``), ``C`` the log-ratio clamp, ``lr_c = clamp(lr, -C, C)``.

Every sum over tokens selects the valid positions (``where(valid, m x, 0)``, not a product), so
values at masked positions (NaN, inf) never reach an output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _codes

Tensor = torch.Tensor

# The metric vector, in this order (rlkernels.ops.rollout turns it into a dict).
METRICS = ("k1", "k3", "abs_diff_mean", "abs_diff_max", "chi2_token", "chi2_seq",
           "log_ppl_diff", "weight_mean", "weight_max", "weight_min", "ess", "frac_high",
           "frac_low", "rejected_frac", "rejected_seq_frac")

# nums (the op's float[] argument): (lo, hi, C, then (lo_i, hi_i) of each reject code i)
N_NUMS = 3 + 2 * len(_codes.ROLLOUT_REJECTS)


def compute_dtype(old: Tensor, rollout: Tensor) -> torch.dtype:
    """fp64 when either log-prob input is fp64, else fp32."""
    return torch.float64 if torch.float64 in (old.dtype, rollout.dtype) else torch.float32


def _sel(valid: Tensor, x: Tensor, fill: float = 0.0) -> Tensor:
    return torch.where(valid, x, torch.full_like(x, fill))


def _reject_codes(reject: str):
    return [_codes.ROLLOUT_REJECTS[r] for r in reject.split(",") if r]


def rollout_correction_forward(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                               advantages: Optional[Tensor], level: str, mode: str,
                               reject: str, nums) -> Tuple[Tensor, Tensor, Tensor]:
    """``(weights [B, T] compute dtype, keep [B, T] bool, metrics [len(METRICS)] fp32)``."""
    cdt = compute_dtype(old_logp, rollout_logp)
    if old_logp.numel() == 0:  # B == 0 or T == 0: nothing valid, every metric 0
        return (torch.zeros(old_logp.shape, dtype=cdt, device=old_logp.device),
                torch.zeros(old_logp.shape, dtype=torch.bool, device=old_logp.device),
                torch.zeros(len(METRICS), dtype=torch.float32, device=old_logp.device))
    lo, hi, clamp = float(nums[0]), float(nums[1]), float(nums[2])
    # contiguous: torch's reductions run in memory order, and a row's result must not
    # depend on the inputs' layout (bit for bit)
    old, roll = old_logp.to(cdt).contiguous(), rollout_logp.to(cdt).contiguous()
    mask = mask.contiguous()
    valid = mask != 0
    m = _sel(valid, mask.to(cdt))
    zero = torch.zeros((), dtype=cdt, device=old.device)
    lr = _sel(valid, old - roll)                       # exactly 0 at masked positions
    lr_c = lr.clamp(-clamp, clamp)
    count = m.sum(-1)                                  # [B]
    nonempty = valid.any(-1)
    seq_lr = (m * lr).sum(-1)                          # sum_t m lr (unclamped)

    # ---- importance weights
    if level == "token":
        log_w = lr_c
    elif level == "sequence":
        log_w = seq_lr.clamp(-clamp, clamp)[:, None].expand_as(lr)
    else:  # geometric: the per-token mean of the log-ratio
        mean_lr = torch.where(nonempty, seq_lr / count.clamp_min(1e-30), zero)
        log_w = mean_lr.clamp(-clamp, clamp)[:, None].expand_as(lr)
    raw = torch.exp(log_w)
    above, below = raw > hi, raw < lo
    if mode == "truncate":
        w = torch.where(above, torch.full_like(raw, hi), torch.where(below, lo, raw))
    else:  # mask: zero outside [lo, hi] (NaN included)
        w = torch.where((raw >= lo) & (raw <= hi), raw, zero)
    weights = _sel(valid, w)

    # ---- rejection
    k1 = -lr_c
    k2 = 0.5 * lr_c * lr_c
    k3 = torch.exp(lr_c) - 1.0 - lr_c
    stats = {"k1": k1, "k2": k2, "k3": k3}
    passed = torch.ones_like(valid)
    for code in _reject_codes(reject):
        name = next(k for k, v in _codes.ROLLOUT_REJECTS.items() if v == code)
        r_lo, r_hi = float(nums[3 + 2 * code]), float(nums[4 + 2 * code])
        if name == "opsm":  # keep if A >= 0 or the sequence mean of k1 <= delta
            s = torch.where(nonempty, (m * k1).sum(-1) / count.clamp_min(1e-30), zero)
            adv = advantages.to(cdt).contiguous()
            adv = adv[:, None].expand_as(lr) if adv.dim() == 1 else adv
            passed = passed & ((adv >= 0) | (s[:, None] <= r_hi))
            continue
        scope, _, est = name.rpartition("_")
        x = stats[est]
        if scope == "token":
            s = x
        elif scope == "seq_sum":
            s = (m * x).sum(-1)[:, None]
        elif scope == "seq_mean":
            s = torch.where(nonempty, (m * x).sum(-1) / count.clamp_min(1e-30), zero)[:, None]
        else:  # seq_max: over the valid tokens, 0 for an empty sequence
            s = torch.where(nonempty, _sel(valid, x, -float("inf")).amax(-1), zero)[:, None]
        passed = passed & (s >= r_lo) & (s <= r_hi)
    keep = valid & passed

    # ---- metrics (token sums over valid positions, weighted by m)
    total = m.sum()
    n_seq = nonempty.sum().to(cdt)

    def mean(x: Tensor) -> Tensor:
        return torch.where(total > 0, (m * _sel(valid, x)).sum() / total.clamp_min(1e-30),
                           zero)

    def seq_mean(x: Tensor) -> Tensor:
        return torch.where(n_seq > 0, _sel(nonempty, x).sum() / n_seq.clamp_min(1), zero)

    def extreme(x: Tensor, fn) -> Tensor:
        fill = -float("inf") if fn is torch.amax else float("inf")
        return torch.where(total > 0, fn(_sel(valid, x, fill)), zero)

    d = lr.abs()
    w2 = weights * weights
    s0, s1, s2 = total, (m * weights).sum(), (m * w2).sum()
    seq_lr_c = seq_lr.clamp(-clamp, clamp)
    mean_lr = torch.where(nonempty, seq_lr / count.clamp_min(1e-30), zero)
    rejected = valid & ~passed
    values = [
        mean(-lr),                                   # k1 of KL(rollout || train)
        mean(torch.exp(lr) - lr - 1.0),              # k3 (unclamped, as verl's k3_kl)
        mean(d), extreme(d, torch.amax),
        mean(torch.exp(2.0 * lr_c) - 1.0),           # chi2_token
        seq_mean(torch.exp(2.0 * seq_lr_c) - 1.0),   # chi2_seq
        seq_mean(-mean_lr),                          # log_ppl_diff
        mean(weights), extreme(weights, torch.amax), extreme(weights, torch.amin),
        torch.where(s0 * s2 > 0, s1 * s1 / (s0 * s2).clamp_min(1e-300), zero),  # ess
        mean(above.to(cdt)), mean(below.to(cdt)),
        mean(rejected.to(cdt)),
        seq_mean(rejected.any(-1).to(cdt)),
    ]
    return weights, keep, torch.stack(values).to(torch.float32)
