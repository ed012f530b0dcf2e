"""verl's functions, with verl's signatures and semantics, on top of rlkernels ops.

From ``verl.utils.torch_functional``: :func:`logprobs_from_logits`, :func:`entropy_from_logits`.
From ``verl.trainer.ppo.core_algos``: :func:`kl_penalty`, :func:`agg_loss`,
:func:`compute_policy_loss_vanilla` (and the older :func:`compute_policy_loss`),
:func:`compute_grpo_outcome_advantage`, :func:`compute_rloo_outcome_advantage`.
:func:`patch` swaps verl's objects for these when verl is importable; :func:`unpatch` undoes it.

Where verl and rlkernels differ, the function bridges to verl's behaviour (each listed here):

* ``logprobs_from_logits``: fp32 output, ``-100`` labels give 0, as verl's default flash-attn
  cross-entropy path. (verl's fallback without flash-attn returns the logits dtype and cannot
  take -100.) ``inplace_backward`` is accepted; rlkernels never keeps an ``[N, V]`` temporary.
* ``entropy_from_logits``: computed in fp32, returned in the dtype of ``logits`` like verl.
* ``kl_penalty``: ``"low_var_kl"``/``"k3"`` clamps ``ref - logp`` to ``[-20, 20]`` before the
  exponential and the result to ``[-10, 10]``: outside ``|logp - ref| > 20`` the value is
  exactly 10 with zero gradient (also for infinite log-probs, where rlkernels alone gives NaN).
  The ``"+"`` suffix is verl's straight-through form ``k2 - sg(k2) + sg(forward)``: the k2
  gradient even where the forward value is clamped (rlkernels' own ``"k3+"`` gives no gradient
  to clamped elements). Outputs have the inputs' dtype (rlkernels returns fp32).
* ``agg_loss``: plain torch (a reduction; nothing to fuse). Denominators as recent verl
  (non-empty sequences for the ``seq-mean-*`` modes); an all-masked batch gives 0 instead of
  NaN, like every rlkernels aggregation.
* ``compute_policy_loss_vanilla``: :func:`rlkernels.policy_loss` with ``loss="ppo"``,
  ``dual_clip=clip_ratio_c``, ``log_ratio_clamp=20``; verl's metrics are rlkernels'
  ``clipfrac`` (``pg_clipfrac``), ``approx_kl`` (``ppo_kl``) and ``dual_clipfrac``
  (``pg_clipfrac_lower``). verl divides masked means by ``mask.sum() + 1e-8``; rlkernels by
  ``mask.sum()`` (a relative difference below 1e-8).
* ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``:
  :func:`rlkernels.group_advantages` with ``group_index`` (ids of any hashable type, e.g. a
  numpy array of strings, are mapped to ints). verl gives a singleton group mean 0 and std 1
  (GRPO: ``score / (1 + eps)``, or ``score`` without std normalization; RLOO: ``score``),
  whereas rlkernels gives 0: the bridge restores verl's values for singleton groups.
"""

from collections.abc import Mapping
from typing import Any, Optional, Tuple

import numpy as np
import torch

import rlkernels

from . import _ModulePatcher

__all__ = ["logprobs_from_logits", "entropy_from_logits", "kl_penalty", "agg_loss",
           "compute_policy_loss", "compute_policy_loss_vanilla",
           "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
           "patch", "unpatch", "is_patched"]

_patcher = _ModulePatcher("verl")


# ================================================================== verl.utils.torch_functional

def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                         inplace_backward: bool = True) -> torch.Tensor:
    """``log_softmax(logits)`` gathered at ``labels``: ``[..., V], [...] -> [...]`` fp32;
    ``labels == -100`` gives 0."""
    return rlkernels.token_logprobs(logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z) - sum(softmax(z) z)`` over the last dim, in the dtype of ``logits``."""
    return rlkernels.entropy(logits).to(logits.dtype)


# ===================================================================== verl.trainer.ppo.core_algos

_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2",
             "low_var_kl": "k3", "k3": "k3"}


def _kl_forward(logprob, ref_logprob, name):
    est = _KL_NAMES.get(name)
    if est is None:
        if name == "full":
            raise NotImplementedError("kl_penalty 'full' needs the full distributions")
        raise NotImplementedError(f"kl_penalty: unknown estimator {name!r}; expected one of "
                                  f"{sorted(_KL_NAMES)} (optionally with a '+' suffix)")
    if est != "k3":
        return rlkernels.kl_penalty(logprob, ref_logprob, estimator=est)
    # verl: kl = clamp(ref - logp, -20, 20); clamp(exp(kl) - kl - 1, -10, 10). Beyond |d| > 20
    # the value is 10 either way, with zero gradient; keep infinities out of the op.
    d = (logprob - ref_logprob).detach()
    out = d.abs() > 20
    safe = torch.where(out, ref_logprob.detach().to(logprob.dtype), logprob)
    res = rlkernels.kl_penalty(safe, ref_logprob, estimator="k3", clamp=(-10.0, 10.0))
    return torch.where(out, torch.full_like(res, 10.0), res)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's per-token KL estimators: ``"kl"``/``"k1"``, ``"abs"``, ``"mse"``/``"k2"``,
    ``"low_var_kl"``/``"k3"`` (clamped as in verl), each optionally with ``"+"``
    (value of the estimator, gradient of k2)."""
    dtype = torch.result_type(logprob, ref_logprob)
    straight = kl_penalty.endswith("+")
    name = kl_penalty[:-1] if straight else kl_penalty
    forward = _kl_forward(logprob, ref_logprob, name)
    if straight and _KL_NAMES.get(name) != "k2":
        backward = rlkernels.kl_penalty(logprob, ref_logprob, estimator="k2")
        forward = backward - backward.detach() + forward.detach()
    return forward.to(dtype)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str,
             dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None) -> torch.Tensor:
    """verl's loss aggregation over ``[B, T]``: ``"token-mean"``, ``"seq-mean-token-sum"``,
    ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"`` (sum / ``loss_scale_factor`` or
    ``T``). ``batch_num_tokens`` / ``global_batch_size`` replace the local token / sequence
    count, times ``dp_size``, as in verl."""
    mask = loss_mask.to(loss_mat.dtype)
    masked = loss_mat * mask

    def div(num, den):
        den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
        return torch.where(den != 0, num / torch.where(den != 0, den, 1), num.new_zeros(()))

    if loss_agg_mode == "token-mean":
        den = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return div(masked.sum(), den) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        counts = mask.sum(-1)
        seq = masked.sum(-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq = seq / (counts + 1e-8)
        seq_mask = (counts > 0).to(seq.dtype)
        den = seq_mask.sum() if global_batch_size is None else global_batch_size
        return div((seq * seq_mask).sum(), den) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        den = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return masked.sum() / den
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _cfg(config, name, default):
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None and name != "clip_ratio_low" and name != "clip_ratio_high" \
        else value


def _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_low, clip_high,
         clip_ratio_c, rollout_is_weights=None):
    if not clip_ratio_c > 1.0:
        raise ValueError("The lower bound of the clip_ratio_c for dual-clip PPO should be greater "
                         f"than 1.0, but get the value: {clip_ratio_c}.")
    loss, m = rlkernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="ppo", clip_low=clip_low,
        clip_high=clip_high, dual_clip=clip_ratio_c, agg=loss_agg_mode, log_ratio_clamp=20.0,
        is_weights=rollout_is_weights)
    return loss, m["clipfrac"], m["approx_kl"], m["dual_clipfrac"]


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                advantages: torch.Tensor, response_mask: torch.Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Optional[torch.Tensor] = None, *,
                                clip_ratio: float = 0.2, clip_ratio_low: Optional[float] = None,
                                clip_ratio_high: Optional[float] = None,
                                clip_ratio_c: float = 3.0
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's vanilla PPO policy loss with dual clip: ``(pg_loss, pg_clipfrac, ppo_kl,
    pg_clipfrac_lower)``. Clip settings come from ``config`` (verl's actor config, attributes
    or a mapping: ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``)
    when given, else from the keyword arguments; a missing low/high side means ``clip_ratio``."""
    if config is not None:
        clip_ratio = _cfg(config, "clip_ratio", clip_ratio)
        clip_ratio_low = _cfg(config, "clip_ratio_low", clip_ratio_low)
        clip_ratio_high = _cfg(config, "clip_ratio_high", clip_ratio_high)
        clip_ratio_c = _cfg(config, "clip_ratio_c", clip_ratio_c)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    return _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                clip_ratio_c, rollout_is_weights)


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None,
                        cliprange_low=None, cliprange_high=None, clip_ratio_c=3.0,
                        loss_agg_mode: str = "token-mean"):
    """verl's earlier ``compute_policy_loss`` signature (same math as the vanilla loss)."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                clip_ratio_c)


def _group_ids(index, device):
    if isinstance(index, torch.Tensor):
        ids = index.reshape(-1).to(torch.int64)
    else:
        arr = np.asarray(index, dtype=object).reshape(-1)
        lookup = {}
        ids = torch.tensor([lookup.setdefault(v, len(lookup)) for v in arr.tolist()],
                           dtype=torch.int64)
    ids = ids.to(device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    per_member = counts[inverse]
    return ids, per_member


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config: Any = None
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's GRPO outcome advantage: scores = sum of token rewards, normalized within the
    groups of ``index``; returns ``(advantages, returns)`` (the same tensor) ``[B, T]``."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        method = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
        adv = rlkernels.group_advantages(scores, group_index=ids, method=method, eps=epsilon)
        adv = adv.to(scores.dtype)
        single = scores / (1 + epsilon) if norm_adv_by_std_in_grpo else scores
        adv = torch.where(n == 1, single, adv)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                   config: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's RLOO outcome advantage: score minus the mean of the other members of its group
    (a singleton keeps its score); returns ``(advantages, returns)`` ``[B, T]``."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        adv = rlkernels.group_advantages(scores, group_index=ids, method="rloo")
        adv = torch.where(n == 1, scores, adv.to(scores.dtype))
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


# ========================================================================================= patch

_TARGETS = {
    "verl.utils.torch_functional": ("logprobs_from_logits", "entropy_from_logits"),
    "verl.trainer.ppo.core_algos": ("kl_penalty", "agg_loss", "compute_policy_loss",
                                    "compute_policy_loss_vanilla",
                                    "compute_grpo_outcome_advantage",
                                    "compute_rloo_outcome_advantage"),
}


def _registries():
    import sys
    mod = sys.modules.get("verl.trainer.ppo.core_algos")
    return [getattr(mod, n) for n in ("POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY")
            if isinstance(getattr(mod, n, None), dict)]


def patch() -> None:
    """Replace verl's functions (module attributes in every imported ``verl.*`` module and the
    entries of its policy-loss / advantage registries) with these. Raises ``ImportError`` when
    verl is not importable. Idempotent."""
    import importlib
    here = globals()
    pairs = {}
    for modname, names in _TARGETS.items():
        mod = importlib.import_module(modname)
        for name in names:
            if hasattr(mod, name):
                pairs[name] = (getattr(mod, name), here[name])
    _patcher.patch(pairs, _registries)


def unpatch() -> None:
    """Restore verl's original functions exactly. A no-op when not patched."""
    _patcher.unpatch(_registries)


def is_patched() -> bool:
    return _patcher.active
