"""verl's functions, with verl's signatures and semantics, on top of rlkernels ops.

From ``verl.utils.torch_functional``: :func:`logprobs_from_logits`, :func:`entropy_from_logits`.
From ``verl.trainer.ppo.core_algos``: :func:`kl_penalty`, :func:`agg_loss`,
:func:`compute_policy_loss_vanilla` (and the older :func:`compute_policy_loss`),
:func:`compute_policy_loss_cispo`, :func:`compute_policy_loss_gspo`,
:func:`compute_policy_loss_gpg`, ``_sapo``, ``_clip_cov``, ``_kl_cov``, ``_geo_mean``,
``_dro``, ``_dppo_tv``, ``_dppo_kl``, :func:`compute_gae_advantage_return`,
:func:`compute_grpo_outcome_advantage` (and ``_vectorized``),
:func:`compute_rloo_outcome_advantage` (and ``_vectorized``), and the ``opo``, ``gpg``,
``grpo_passk``, ``reinforce_plus_plus(_baseline)``, ``gdpo``, ``remax`` estimators
(``compute_<name>_outcome_advantage``). From ``verl.trainer.ppo.rollout_corr_helper``:
:func:`compute_rollout_correction_weights`, :func:`compute_rollout_rejection_mask`,
:func:`compute_rollout_correction_and_rejection_mask`, :func:`compute_offpolicy_metrics`,
:func:`compute_rollout_corr_metrics_from_logprobs` (on :func:`rlkernels.rollout_correction`).
docs/math.md lists where each differs from verl.
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
  NaN, like every rlkernels aggregation. Values at masked positions are selected away before
  any sum in every mode (verl 0.9.1 does so for ``token-mean`` / ``token-sum`` only; its
  ``seq-mean-*`` modes let a NaN at a masked position of a non-empty sequence through).
  ``"seq-mean-token-sum-norm"`` depends on the verl version: the token sum over ``T`` for
  verl <= 0.8, the mean over non-empty sequences of the token sums, over ``T``, for
  verl >= 0.9. ``verl_version=`` chooses explicitly; by default :data:`VERL_VERSION`, the
  installed verl's version read once at import from its package metadata (verl itself is not
  imported), or the newest form when verl is not installed. :func:`patch` changes nothing
  here, so results never depend on whether it ran. Checked against verl 0.9.1 in
  tests/integrations/test_verl_real.py.
* ``compute_policy_loss_vanilla``: :func:`rlkernels.policy_loss` with ``loss="ppo"``,
  ``dual_clip=clip_ratio_c``, ``log_ratio_clamp=20``; verl's metrics are rlkernels'
  ``clipfrac`` (``pg_clipfrac``), ``approx_kl`` (``ppo_kl``) and ``dual_clipfrac``
  (``pg_clipfrac_lower``); ``config.global_batch_info`` is honoured. It returns verl <= 0.5's
  4-tuple; :func:`compute_policy_loss_vanilla_metrics` returns verl >= 0.6's
  ``(loss, metrics dict)`` and is what :func:`patch` installs there. verl divides masked
  means by ``mask.sum() + 1e-8``; rlkernels by ``mask.sum()`` (a relative difference below
  1e-8).
* ``compute_policy_loss_cispo``: :func:`rlkernels.policy_loss` with ``loss="cispo"`` and
  ``cispo_clip_low=True``: verl clamps the ratio to ``[1 - clip_ratio_low,
  1 + clip_ratio_high]`` (rlkernels' default cispo, TRL's form, has no lower bound).
  ``pg_clipfrac`` is the share of clamped ratios on either side (rlkernels' ``clipfrac``),
  ``pg_clipfrac_lower`` is 0 as in verl.
* ``compute_gae_advantage_return``: :func:`rlkernels.gae` (masked positions skipped), then
  verl's values at masked positions: verl carries the running advantage through a masked
  position (it equals the advantage of the next valid position, 0 after the last), where
  :func:`rlkernels.gae` outputs 0; ``returns = advantages + values`` everywhere, then
  :func:`rlkernels.masked_whiten` (eps 1e-8) of the advantages, as verl. verl raises when
  fewer than two positions are valid; here the result stays finite
  (:func:`rlkernels.masked_whiten`). Values at masked positions never reach a valid
  position (verl's ``x * mask + ...`` lets a NaN value there through).
* ``compute_grpo_outcome_advantage`` / ``compute_rloo_outcome_advantage``:
  :func:`rlkernels.group_advantages` with ``group_index`` (ids of any hashable type, e.g. a
  numpy array of strings, are mapped to ints). verl gives a singleton group mean 0 and std 1
  (GRPO: ``score / (1 + eps)``, or ``score`` without std normalization; RLOO: ``score``),
  whereas rlkernels gives 0: the bridge restores verl's values for singleton groups.
* rollout correction (``compute_rollout_correction_weights``, ``compute_rollout_rejection_mask``,
  ``compute_rollout_correction_and_rejection_mask``, ``compute_offpolicy_metrics``): the weights
  and the rejected mask come from one :func:`rlkernels.rollout_correction` call (TIS:
  ``mode="truncate"``, IcePop ``"lower_upper"``: ``mode="mask"``; the rejection criteria and
  thresholds as verl's), verl's metrics (every key) from the op's metrics where they coincide,
  else plain torch; options are validated with verl's errors. For a binary ``response_mask``
  (verl's contract); a fractional float mask weights verl's raw weights before truncation,
  not the op's. Values at masked positions never reach a weight (verl's ``exp(.) * mask``
  lets a NaN log-ratio there through). ``rollout_is_eff_sample_size`` is ``inf`` where every
  weight is 0 (verl raises ``ZeroDivisionError``). An infinite threshold (``"inf"``) reaches
  the op as the largest float: the same result, except ``seq_sum_k1`` whose summed k1 exceeds
  709 in magnitude. A NaN threshold raises ``ValueError`` (verl accepts it).
"""

import math
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import numpy as np
import torch

import rlkernels

from . import _ModulePatcher

__all__ = ["logprobs_from_logits", "entropy_from_logits", "kl_penalty", "agg_loss",
           "compute_policy_loss", "compute_policy_loss_vanilla",
           "compute_policy_loss_vanilla_metrics", "compute_policy_loss_cispo",
           "compute_policy_loss_gspo", "compute_policy_loss_gpg", "compute_policy_loss_sapo",
           "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov",
           "compute_policy_loss_geo_mean", "compute_policy_loss_dro",
           "compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl",
           "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
           "compute_grpo_vectorized_outcome_advantage", "compute_rloo_outcome_advantage",
           "compute_rloo_vectorized_outcome_advantage", "compute_opo_outcome_advantage",
           "compute_gpg_outcome_advantage", "compute_grpo_passk_outcome_advantage",
           "compute_reinforce_plus_plus_baseline_outcome_advantage",
           "compute_gdpo_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
           "compute_remax_outcome_advantage",
"compute_rollout_correction_weights", "compute_rollout_rejection_mask",
           "compute_rollout_correction_and_rejection_mask", "compute_offpolicy_metrics",
           "compute_rollout_corr_metrics_from_logprobs",
           "VERL_VERSION", "patch", "unpatch", "is_patched"]

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


def _parse_version(version) -> Tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"0.9.1"`` or ``"0.10.0.dev0"``."""
    parts = str(version).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        raise ValueError(f"verl_version: expected a version string such as '0.9.1', "
                         f"got {version!r}") from None


def _installed_verl_version() -> Optional[str]:
    import importlib.metadata
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


# The installed verl's version, read once at import from its package metadata (verl is not
# imported); None when verl is not installed. It selects the verl-version-dependent formulas
# (agg_loss's "seq-mean-token-sum-norm") unless a call passes verl_version= explicitly.
VERL_VERSION: Optional[str] = _installed_verl_version()


def _norm_seq_mean(verl_version) -> bool:
    """Whether "seq-mean-token-sum-norm" averages the token sums over the non-empty sequences
    before dividing by the scale factor (verl >= 0.9) or divides the total token sum (verl <=
    0.8). Without a version (verl not installed): the newest form."""
    version = VERL_VERSION if verl_version is None else verl_version
    return version is None or _parse_version(version) >= (0, 9)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str,
             dp_size: int = 1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None, *, verl_version: Optional[str] = None) -> torch.Tensor:
    """verl's loss aggregation over ``[B, T]``: ``"token-mean"``, ``"token-sum"``,
    ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"`` (token
    sum, averaged over non-empty sequences with verl >= 0.9, then divided by
    ``loss_scale_factor`` or ``T``). ``batch_num_tokens`` / ``global_batch_size`` replace the
    local token / sequence count, times ``dp_size``, as in verl (required when ``dp_size > 1``).

    Values at masked positions (``loss_mask == 0``; NaN or inf included) never reach the
    result, in every mode. ``verl_version`` (e.g. ``"0.8.5"``) picks the version-dependent
    formula; ``None`` means :data:`VERL_VERSION` (the installed verl, else the newest form)."""
    norm_seq_mean = _norm_seq_mean(verl_version)
    mask = loss_mask.to(loss_mat.dtype)
    # a select, not a product: NaN * 0 is NaN
    masked = torch.where(loss_mask != 0, loss_mat * mask, torch.zeros_like(loss_mat))

    def div(num, den):
        den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
        return torch.where(den != 0, num / torch.where(den != 0, den, 1), num.new_zeros(()))

    def need(value, what):
        if value is None and dp_size > 1:
            raise ValueError(f"{what} is required when dp_size > 1")

    if loss_agg_mode == "token-mean":
        need(batch_num_tokens, "(global) batch_num_tokens")
        den = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return div(masked.sum(), den) * dp_size
    if loss_agg_mode == "token-sum":
        return masked.sum() * dp_size
    norm = loss_agg_mode == "seq-mean-token-sum-norm"
    if norm and not norm_seq_mean:
        den = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return masked.sum() / den
    if norm or loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        need(global_batch_size, "global_batch_size")
        counts = mask.sum(-1)
        seq = masked.sum(-1)
        if loss_agg_mode == "seq-mean-token-mean":
            seq = seq / (counts + 1e-8)
        seq_mask = (counts > 0).to(seq.dtype)
        den = seq_mask.sum() if global_batch_size is None else global_batch_size
        loss = div((seq * seq_mask).sum(), den) * dp_size
        if norm:
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
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


def _agg_spec(mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
              loss_scale_factor=None):
    """(agg, normalizer) for rlkernels.policy_loss that reproduce :func:`agg_loss`."""
    if mode not in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                    "seq-mean-token-sum-norm"):
        raise ValueError(f"Invalid loss_agg_mode: {mode}")
    if dp_size == 1 and batch_num_tokens is None and global_batch_size is None \
            and loss_scale_factor is None and mode != "token-sum" \
            and not (mode == "seq-mean-token-sum-norm" and _norm_seq_mean(None)):
        return mode, None
    if mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return "token-mean", n / dp_size
    if mode == "token-sum":
        return "token-mean", 1.0 / dp_size
    factor = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    if mode == "seq-mean-token-sum-norm" and not _norm_seq_mean(None):
        return mode, factor
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    g = (mask.sum(-1) > 0).sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-sum-norm":
        return "seq-mean-token-sum", g * factor / dp_size
    return mode, g / dp_size


def _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_low, clip_high,
         clip_ratio_c, rollout_is_weights=None, batch_info=None):
    if not clip_ratio_c > 1.0:
        raise ValueError("The lower bound of the clip_ratio_c for dual-clip PPO should be greater "
                         f"than 1.0, but get the value: {clip_ratio_c}.")
    agg, normalizer = _agg_spec(loss_agg_mode, response_mask, **dict(batch_info or {}))
    loss, m = rlkernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="ppo", clip_low=clip_low,
        clip_high=clip_high, dual_clip=clip_ratio_c, agg=agg, normalizer=normalizer,
        log_ratio_clamp=20.0, is_weights=rollout_is_weights)
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
    when given, else from the keyword arguments; a missing low/high side means ``clip_ratio``.
    ``config.global_batch_info`` (verl's ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``) goes to the aggregation as in verl.

    This is the 4-tuple form of verl <= 0.5; verl >= 0.6 returns ``(pg_loss, metrics)`` with
    ``metrics`` a dict of floats: :func:`compute_policy_loss_vanilla_metrics`, which
    :func:`patch` installs when the installed verl uses that form."""
    batch_info = None
    if config is not None:
        clip_ratio = _cfg(config, "clip_ratio", clip_ratio)
        clip_ratio_low = _cfg(config, "clip_ratio_low", clip_ratio_low)
        clip_ratio_high = _cfg(config, "clip_ratio_high", clip_ratio_high)
        clip_ratio_c = _cfg(config, "clip_ratio_c", clip_ratio_c)
        batch_info = _cfg(config, "global_batch_info", None)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    return _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                clip_ratio_c, rollout_is_weights, batch_info)


def compute_policy_loss_vanilla_metrics(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                        advantages: torch.Tensor, response_mask: torch.Tensor,
                                        loss_agg_mode: str = "token-mean", config: Any = None,
                                        rollout_is_weights: Optional[torch.Tensor] = None,
                                        **kwargs) -> Tuple[torch.Tensor, dict]:
    """:func:`compute_policy_loss_vanilla` in the form of verl >= 0.6 (the policy-loss registry
    signature): ``(pg_loss, {"actor/pg_clipfrac": float, "actor/ppo_kl": float,
    "actor/pg_clipfrac_lower": float})``."""
    loss, clipfrac, ppo_kl, lower = compute_policy_loss_vanilla(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights, **kwargs)
    return loss, {"actor/pg_clipfrac": clipfrac.detach().item(),
                  "actor/ppo_kl": ppo_kl.detach().item(),
                  "actor/pg_clipfrac_lower": lower.detach().item()}


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None,
                        cliprange_low=None, cliprange_high=None, clip_ratio_c=3.0,
                        loss_agg_mode: str = "token-mean"):
    """verl's earlier ``compute_policy_loss`` signature (same math as the vanilla loss)."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _ppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, low, high,
                clip_ratio_c)


def _clips(config, what: str):
    """``(clip_low, clip_high, global_batch_info)`` from verl's actor config."""
    if config is None:
        raise ValueError(f"config: expected verl's actor config (clip_ratio, clip_ratio_low, "
                         f"clip_ratio_high) for {what}, got None")
    clip_ratio = _cfg(config, "clip_ratio", 0.2)
    low = _cfg(config, "clip_ratio_low", None)
    high = _cfg(config, "clip_ratio_high", None)
    return (clip_ratio if low is None else low, clip_ratio if high is None else high,
            _cfg(config, "global_batch_info", None))


def compute_policy_loss_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                              advantages: torch.Tensor, response_mask: torch.Tensor,
                              loss_agg_mode: str = "token-mean", config: Any = None,
                              rollout_is_weights: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, dict]:
    """verl's CISPO loss (its policy-loss registry's ``"cispo"``): with ``r = exp(clamp(logp -
    old_logp, -20, 20))``, ``-sg(clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) A logp``
    per token, times ``rollout_is_weights``, aggregated by :func:`agg_loss`. Clip settings come
    from ``config`` (verl's actor config: ``clip_ratio``, ``clip_ratio_low``,
    ``clip_ratio_high``, ``global_batch_info``); a missing low/high side means ``clip_ratio``.
    Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``
    (floats; ``pg_clipfrac`` counts ratios clamped on either side, ``pg_clipfrac_lower`` is 0
    as in verl). This is :func:`rlkernels.policy_loss` with ``loss="cispo",
    cispo_clip_low=True`` (rlkernels' default cispo has no lower clamp)."""
    low, high, batch_info = _clips(config, "cispo")
    agg, normalizer = _agg_spec(loss_agg_mode, response_mask, **dict(batch_info or {}))
    loss, m = rlkernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="cispo", clip_low=low,
        clip_high=high, cispo_clip_low=low <= 1.0,  # a floor below 0 clamps nothing (r >= 0)
        agg=agg, normalizer=normalizer, log_ratio_clamp=20.0, is_weights=rollout_is_weights)
    return loss, {"actor/pg_clipfrac": m["clipfrac"].detach().item(),
                  "actor/ppo_kl": m["approx_kl"].detach().item(),
                  "actor/pg_clipfrac_lower": 0.0}


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, dict]:
    """verl's GSPO loss (its policy-loss registry's ``"gspo"``): the PPO clip of the
    sequence-level ratio ``s_i = exp(mean_t (logp - old_logp))`` carried per token as
    ``sg(s_i) logp / sg(logp)``, times ``rollout_is_weights``, aggregated by :func:`agg_loss`.
    :func:`rlkernels.policy_loss` with ``loss="ppo", ratio_level="sequence"``. Returns
    ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})`` (floats,
    ``pg_clipfrac_lower`` 0 as in verl). verl clamps the sequence log-ratio at 10 from above;
    here each token's log-ratio is clamped to ``[-20, 20]`` before the mean: the two differ
    only for a sequence whose mean log-ratio exceeds 10 (a ratio above 22026)."""
    low, high, batch_info = _clips(config, "gspo")
    agg, normalizer = _agg_spec(loss_agg_mode, response_mask, **dict(batch_info or {}))
    loss, m = rlkernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="ppo", clip_low=low,
        clip_high=high, ratio_level="sequence", agg=agg, normalizer=normalizer,
        log_ratio_clamp=20.0, is_weights=rollout_is_weights)
    return loss, {"actor/pg_clipfrac": m["clipfrac"].detach().item(),
                  "actor/ppo_kl": m["approx_kl"].detach().item(),
                  "actor/pg_clipfrac_lower": 0.0}


def compute_policy_loss_gpg(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, dict]:
    """verl's GPG loss (its policy-loss registry's ``"gpg"``): ``-A logp`` per token, times
    ``rollout_is_weights``, aggregated by :func:`agg_loss`; ``(pg_loss, {})`` as verl.
    :func:`rlkernels.policy_loss` with ``loss="reinforce"``."""
    if config is None:
        raise ValueError("config: expected verl's actor config for gpg, got None")
    batch_info = _cfg(config, "global_batch_info", None)
    agg, normalizer = _agg_spec(loss_agg_mode, response_mask, **dict(batch_info or {}))
    loss, _ = rlkernels.policy_loss(
        log_prob, old_log_prob, advantages, response_mask, loss="reinforce", agg=agg,
        normalizer=normalizer, is_weights=rollout_is_weights)
    return loss, {}


def _loss_cfg(config, name, default):
    """``config.policy_loss.<name>`` (verl's PolicyLossConfig), ``default`` when unset."""
    sub = _cfg(config, "policy_loss", None)
    value = None if sub is None else _cfg(sub, name, None)
    return default if value is None else value


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` (a metric of the bridge; values at masked positions selected
    away)."""
    m = mask.to(x.dtype)
    return torch.where(mask != 0, x * m, torch.zeros_like(x)).sum() / (m.sum() + 1e-8)


def _floats(metrics: dict) -> dict:
    return {k: float(v.detach().item()) if isinstance(v, torch.Tensor) else float(v)
            for k, v in metrics.items()}


# no log-ratio clamp (verl's clip_cov / kl_cov / geo_mean / dro exponentiate it as it is)
_NO_CLAMP = 1e30


def _registry_loss(loss: str, old_log_prob, log_prob, advantages, response_mask,
                   loss_agg_mode, config, rollout_is_weights, **options):
    """:func:`rlkernels.policy_loss` with verl's aggregation (``config.global_batch_info``)."""
    batch_info = _cfg(config, "global_batch_info", None)
    agg, normalizer = _agg_spec(loss_agg_mode, response_mask, **dict(batch_info or {}))
    return rlkernels.policy_loss(log_prob, old_log_prob, advantages, response_mask, loss=loss,
                                 agg=agg, normalizer=normalizer,
                                 is_weights=rollout_is_weights, **options)


def compute_policy_loss_sapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                             advantages: torch.Tensor, response_mask: torch.Tensor,
                             loss_agg_mode: str = "seq-mean-token-mean", config: Any = None,
                             rollout_is_weights: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, dict]:
    """verl's SAPO loss: ``-(4 / tau) sigmoid(tau (r - 1)) A`` (``tau_pos`` / ``tau_neg`` of
    the actor config), aggregated ``"seq-mean-token-mean"`` whatever ``loss_agg_mode`` (as
    verl): :func:`rlkernels.policy_loss` ``loss="sapo"``."""
    if config is None:
        raise ValueError("config: expected verl's actor config for sapo, got None")
    loss, m = _registry_loss("sapo", old_log_prob, log_prob, advantages, response_mask,
                             "seq-mean-token-mean", config, rollout_is_weights,
                             tau_pos=float(_cfg(config, "tau_pos", 1.0)),
                             tau_neg=float(_cfg(config, "tau_neg", 1.05)))
    return loss, _floats({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": m["approx_kl"],
                          "actor/pg_clipfrac_lower": 0.0})


def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                 advantages: torch.Tensor, response_mask: torch.Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, dict]:
    """verl's Clip-Cov loss: :func:`rlkernels.policy_loss` ``loss="clip_cov"``. verl draws
    the covariance-selected tokens at random among the candidates; rlkernels takes the ones
    of largest covariance (deterministic, on device): the two agree whenever there are no
    more candidates than tokens to select. ``pg_clipfrac`` is the selected tokens' share."""
    low, high, _ = _clips(config, "clip_cov")
    loss, m = _registry_loss(
        "clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights, clip_low=low, clip_high=high, log_ratio_clamp=_NO_CLAMP,
        clip_cov_ratio=float(_loss_cfg(config, "clip_cov_ratio", 2e-4)),
        clip_cov_lb=float(_loss_cfg(config, "clip_cov_lb", 1.0)),
        clip_cov_ub=float(_loss_cfg(config, "clip_cov_ub", 5.0)))
    selected = m["clipfrac"] - m["clipfrac_high"] - m["clipfrac_low"]
    return loss, _floats({"actor/pg_clipfrac": selected, "actor/ppo_kl": m["approx_kl"]})


def compute_policy_loss_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                               advantages: torch.Tensor, response_mask: torch.Tensor,
                               loss_agg_mode: str = "token-mean", config: Any = None,
                               rollout_is_weights: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, dict]:
    """verl's KL-Cov loss: :func:`rlkernels.policy_loss` ``loss="kl_cov"`` (``kl_cov_ratio``,
    ``ppo_kl_coef`` of ``config.policy_loss``); ``ppo_kl`` is verl's masked mean of ``|log
    r|``."""
    if config is None:
        raise ValueError("config: expected verl's actor config for kl_cov, got None")
    loss, _ = _registry_loss(
        "kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights, log_ratio_clamp=_NO_CLAMP,
        kl_cov_ratio=float(_loss_cfg(config, "kl_cov_ratio", 2e-4)),
        kl_cov_coef=float(_loss_cfg(config, "ppo_kl_coef", 1.0)))
    with torch.no_grad():
        kl = _masked_mean((log_prob - old_log_prob).abs(), response_mask)
    return loss, _floats({"actor/ppo_kl": kl})


def compute_policy_loss_geo_mean(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                 advantages: torch.Tensor, response_mask: torch.Tensor,
                                 loss_agg_mode: str = "token-mean", config: Any = None,
                                 rollout_is_weights: Optional[torch.Tensor] = None
                                 ) -> Tuple[torch.Tensor, dict]:
    """verl's GMPO (``"geo_mean"``): :func:`rlkernels.policy_loss` ``loss="gmpo"``, the mean
    over all ``B`` sequences (verl ignores ``loss_agg_mode`` here). ``pg_clipfrac`` /
    ``pg_clipfrac_lower``: verl's share of tokens whose log-ratio lies outside ``[-clip_low,
    clip_high]``, where ``A > 0`` / ``A < 0``."""
    low, high, _ = _clips(config, "geo_mean")
    b = response_mask.shape[0]
    loss, m = rlkernels.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                    loss="gmpo", clip_low=low, clip_high=high,
                                    agg="seq-mean-token-mean", normalizer=b,
                                    log_ratio_clamp=_NO_CLAMP, is_weights=rollout_is_weights)
    with torch.no_grad():
        d = log_prob - old_log_prob
        out = ((d < -low) | (d > high)).to(d.dtype)
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(d)
        metrics = {"actor/pg_clipfrac": _masked_mean(out * (adv > 0), response_mask),
                   "actor/ppo_kl": m["approx_kl"],
                   "actor/pg_clipfrac_lower": _masked_mean(out * (adv < 0), response_mask)}
    return loss, _floats(metrics)


def compute_policy_loss_dro(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean", config: Any = None,
                            rollout_is_weights: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, dict]:
    """verl's DRO loss: ``-A logp + beta / 2 (log r)^2`` (``config.policy_loss.dro_beta`` >
    0): :func:`rlkernels.policy_loss` ``loss="dro"``."""
    beta = _loss_cfg(config, "dro_beta", None) if config is not None else None
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    loss, m = _registry_loss("dro", old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode, config, rollout_is_weights,
                             log_ratio_clamp=_NO_CLAMP, dro_beta=float(beta))
    return loss, _floats({"actor/ppo_kl": m["approx_kl"]})


def _dppo(kind, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
          rollout_is_weights):
    low, high, _ = _clips(config, kind)
    loss, m = _registry_loss(kind, old_log_prob, log_prob, advantages, response_mask,
                             loss_agg_mode, config, rollout_is_weights, clip_low=low,
                             clip_high=high, dual_clip=float(_cfg(config, "clip_ratio_c", 20.0)))
    return loss, _floats({"actor/pg_clipfrac": m["clipfrac"], "actor/ppo_kl": m["approx_kl"],
                          "actor/pg_clipfrac_lower": m["dual_clipfrac"]})


def compute_policy_loss_dppo_tv(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                advantages: torch.Tensor, response_mask: torch.Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Optional[torch.Tensor] = None
                                ) -> Tuple[torch.Tensor, dict]:
    """verl's DPPO-Binary-TV loss: :func:`rlkernels.policy_loss` ``loss="dppo_tv"`` with the
    config's clip ratios as divergence thresholds and ``clip_ratio_c`` as the truncation."""
    return _dppo("dppo_tv", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                 config, rollout_is_weights)


def compute_policy_loss_dppo_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                                advantages: torch.Tensor, response_mask: torch.Tensor,
                                loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: Optional[torch.Tensor] = None
                                ) -> Tuple[torch.Tensor, dict]:
    """verl's DPPO-Binary-KL loss: :func:`rlkernels.policy_loss` ``loss="dppo_kl"``."""
    return _dppo("dppo_kl", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                 config, rollout_is_weights)


def _at_next_valid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` at the first valid position at or after each position of its row (0 after the
    last): the value a reverse scan carries through masked positions. No host sync."""
    b, t = x.shape
    pos = torch.arange(t, device=x.device).expand(b, t)
    nxt = torch.where(valid, pos, t).flip(-1).cummin(-1).values.flip(-1)
    return torch.cat([x, x.new_zeros(b, 1)], -1).gather(-1, nxt)


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's GAE (its advantage registry's ``"gae"``): ``(advantages, returns)`` ``[B, T]``.

    A reverse scan with masked positions (``response_mask == 0``, e.g. observation tokens)
    skipped, as :func:`rlkernels.gae`; at a masked position verl's scan output is the running
    value it carries, i.e. the advantage of the next valid position (0 after the last one),
    and so it is here. ``returns = advantages + values`` at every position, then the
    advantages are whitened over the valid positions (``masked_whiten``, eps 1e-8), every
    position transformed, as verl. Values at masked positions never reach a valid position.
    Computed in fp32 (fp64 for fp64 inputs), returned in the inputs' dtype."""
    with torch.no_grad():
        dtype = torch.result_type(token_level_rewards, values)
        adv, _ = rlkernels.gae(token_level_rewards, values, response_mask, gamma=float(gamma),
                               lam=float(lam))
        adv = _at_next_valid(adv, response_mask != 0)
        returns = adv + values.to(adv.dtype)
        adv = rlkernels.masked_whiten(adv, response_mask, eps=1e-8)
    return adv.to(dtype), returns.to(dtype)


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


def compute_grpo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor,
                                              response_mask: torch.Tensor, index,
                                              epsilon: float = 1e-6,
                                              norm_adv_by_std_in_grpo: bool = True,
                                              config: Any = None
                                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"grpo_vectorized"`` estimator: the same values as
    :func:`compute_grpo_outcome_advantage` (verl computes its group statistics in fp32 with a
    scatter instead of a Python loop over the groups)."""
    adv, _ = compute_grpo_outcome_advantage(
        token_level_rewards.float(), response_mask, index, epsilon, norm_adv_by_std_in_grpo)
    return adv, adv


def compute_rloo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor,
                                              response_mask: torch.Tensor, index,
                                              epsilon: float = 1e-6, config: Any = None,
                                              **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"rloo_vectorized"`` estimator: score minus the mean of the other members of
    its group; unlike :func:`compute_rloo_outcome_advantage`, a singleton group gives 0
    (rlkernels' own convention)."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, _ = _group_ids(index, scores.device)
        adv = rlkernels.group_advantages(scores, group_index=ids, method="rloo")
        adv = adv.to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def _singleton_fix(adv: torch.Tensor, n: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """verl gives a group of one member the baseline 0 (and std 1) where rlkernels gives 0:
    ``value`` at those rows (a select on device)."""
    return torch.where(n == 1, value.to(adv.dtype), adv)


def compute_opo_outcome_advantage(token_level_rewards: torch.Tensor,
                                  response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                  config: Any = None, **kwargs
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"opo"``: score minus its group's length-weighted mean score (response lengths
    from ``response_mask``): :func:`rlkernels.group_advantages` ``method="opo"``; a singleton
    keeps its score as in verl."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        adv = rlkernels.group_advantages(scores, group_index=ids, method="opo",
                                         mask=response_mask)
        adv = _singleton_fix(adv.to(scores.dtype), n, scores).unsqueeze(-1) * response_mask
    return adv, adv


def compute_gpg_outcome_advantage(token_level_rewards: torch.Tensor,
                                  response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                  f_norm: float = 1.0, alpha: float = 1.0, config: Any = None,
                                  **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"gpg"`` estimator: ``(B / max(m, 1)) (score - group mean)``, ``m`` the number of
    non-zero scores (verl recomputes ``alpha`` this way and ignores ``f_norm``'s default 1):
    :func:`rlkernels.group_advantages` ``method="gpg"``; a singleton has mean 0 as in verl."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        adv = rlkernels.group_advantages(scores, group_index=ids, method="gpg").to(scores.dtype)
        scale = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
        adv = _singleton_fix(adv / f_norm, n, scale * scores / f_norm)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_grpo_passk_outcome_advantage(token_level_rewards: torch.Tensor,
                                         response_mask: torch.Tensor, index,
                                         epsilon: float = 1e-6,
                                         norm_adv_by_std_in_grpo: bool = True,
                                         config: Any = None, **kwargs
                                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"grpo_passk"``: only the best member of each group gets ``(r_max - r_2nd) /
    (std + eps)`` (``norm_adv_by_std_in_grpo`` from ``config`` as verl); verl raises for a
    group of one member, and so does this (a host check)."""
    if config is None:
        raise ValueError("config: expected verl's algorithm config for grpo_passk, got None")
    norm = _cfg(config, "norm_adv_by_std_in_grpo", True)
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        if bool((n < 2).any()):
            raise ValueError("grpo_passk: Pass@k requires at least 2 samples per group")
        adv = rlkernels.group_advantages(scores, group_index=ids, method="grpo_passk",
                                         eps=epsilon, norm_by_std=bool(norm))
        adv = adv.to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def _whitened_tokens(d: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_whiten(d[:, None] * mask, mask) * mask`` (eps 1e-8)."""
    tok = d.unsqueeze(-1) * response_mask
    return rlkernels.masked_whiten(tok, response_mask, eps=1e-8).to(d.dtype) * response_mask


def compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
        epsilon: float = 1e-6, config: Any = None, **kwargs
) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"reinforce_plus_plus_baseline"``: score minus its group mean (a singleton's
    mean is 0), broadcast over the response and whitened over the batch's valid tokens:
    :func:`rlkernels.group_advantages` (``"dr_grpo"``) then :func:`rlkernels.masked_whiten`
    (the fused ``method="reinforce_plus_plus_baseline"`` gives singletons 0 instead)."""
    scores = token_level_rewards.sum(dim=-1)
    with torch.no_grad():
        ids, n = _group_ids(index, scores.device)
        d = rlkernels.group_advantages(scores, group_index=ids, method="dr_grpo")
        adv = _whitened_tokens(_singleton_fix(d.to(scores.dtype), n, scores), response_mask)
    return adv, adv


def compute_gdpo_outcome_advantage(token_level_rewards: torch.Tensor,
                                   response_mask: torch.Tensor, index, epsilon: float = 1e-6,
                                   norm_adv_by_std_in_grpo: bool = True, config: Any = None,
                                   non_tensor_batch: Optional[dict] = None,
                                   batch: Optional[dict] = None, **kwargs
                                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"gdpo"``: each reward component (``config.gdpo_reward_keys`` of
    ``non_tensor_batch``, placed at the last response token as verl does; else the token
    rewards) normalized as GRPO within its group (:func:`compute_grpo_outcome_advantage`),
    summed with ``config.gdpo_reward_weights``, whitened over the valid tokens
    (:func:`rlkernels.masked_whiten`)."""
    components, weights = [token_level_rewards], None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = _cfg(config, "gdpo_reward_keys", None)
        if not keys:
            raise ValueError("config: GDPO requires 'algorithm.gdpo_reward_keys'")
        device = token_level_rewards.device
        last = batch["attention_mask"][:, batch["prompts"].size(1):].sum(dim=1) - 1
        components = []
        for key in keys:
            if key not in non_tensor_batch:
                raise KeyError(f"GDPO reward key {key!r} not found in non_tensor_batch")
            comp = torch.tensor(np.asarray(non_tensor_batch[key], dtype=np.float32),
                                device=device)
            placed = torch.zeros_like(response_mask, dtype=torch.float32)
            placed[torch.arange(placed.size(0), device=device), last] = comp
            components.append(placed)
        weights = _cfg(config, "gdpo_reward_weights", None)
    w = [1.0] * len(components) if weights is None else [float(x) for x in weights]
    total = None
    for wk, comp in zip(w, components):
        a, _ = compute_grpo_outcome_advantage(comp, response_mask, index, epsilon,
                                              norm_adv_by_std_in_grpo)
        total = wk * a if total is None else total + wk * a
    with torch.no_grad():
        adv = rlkernels.masked_whiten(total, response_mask, eps=1e-8).to(total.dtype)
        adv = adv * response_mask
    return adv, adv


def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: torch.Tensor,
                                                  response_mask: torch.Tensor,
                                                  config: Any = None, **kwargs
                                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"reinforce_plus_plus"``: discounted returns (``config.gamma``) whitened over
    the valid tokens: :func:`rlkernels.discounted_returns` with ``whiten=True``. ``returns``
    are 0 at masked positions, as verl's."""
    if config is None:
        raise ValueError("config: expected verl's algorithm config (gamma) for "
                         "reinforce_plus_plus, got None")
    with torch.no_grad():
        dtype = token_level_rewards.dtype
        adv, ret = rlkernels.discounted_returns(token_level_rewards, response_mask,
                                                gamma=float(_cfg(config, "gamma", 1.0)),
                                                whiten=True, whiten_eps=1e-8)
    return (adv * response_mask).to(dtype), ret.to(dtype)


def compute_remax_outcome_advantage(token_level_rewards: torch.Tensor,
                                    reward_baselines: torch.Tensor,
                                    response_mask: torch.Tensor, config: Any = None, **kwargs
                                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``"remax"``: undiscounted returns-to-go minus the greedy response's reward
    (:func:`rlkernels.discounted_returns` with ``baseline=``). At a masked position verl's
    reverse cumulative sum holds the return of the next valid position (and no baseline is
    subtracted there); the bridge restores those values."""
    with torch.no_grad():
        dtype = token_level_rewards.dtype
        adv, ret = rlkernels.discounted_returns(token_level_rewards, response_mask, gamma=1.0,
                                                baseline=reward_baselines)
        valid = response_mask != 0
        ret = _at_next_valid(ret, valid)
        adv = torch.where(valid, adv, ret)
    return adv.to(dtype), ret.to(dtype)


# ============================================================ verl.trainer.ppo.rollout_corr_helper

_SAFETY_BOUND = 20.0  # verl's SAFETY_BOUND: log-ratios are clamped to +-20 before exp
_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
               "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
_NO_VALID = "response_mask must contain at least one valid token (1)."
# An infinite threshold (verl accepts "inf") reaches the op as the largest finite float (fp32's
# for the importance weights, which never exceed exp(20); fp64's for the rejection bounds).
_FMAX = float(np.finfo(np.float64).max)
_FMAX32 = float(np.finfo(np.float32).max)


def _msum(x: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's ``masked_sum``: ``where(mask, x, 0) * mask`` summed."""
    v = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)) * mask
    return v.sum() if axis is None else v.sum(axis)


def _mmean(x: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's ``masked_mean``: ``masked_sum / (mask.sum() + 1e-8)``."""
    return _msum(x, mask, axis) / ((mask.sum() if axis is None else mask.sum(axis)) + 1e-8)


def _parse_rollout_is_threshold(spec) -> Tuple[float, Optional[float]]:
    """verl's ``(upper, lower)`` of ``rollout_is_threshold`` (a number: TIS, ``lower``
    None; ``"lower_upper"``: IcePop), with verl's errors."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be specified as a float or a string "
                        "threshold specification, not a boolean.")
    if isinstance(spec, (int, float)):
        upper, lower = float(spec), None
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        try:
            if "_" in text:
                lo_s, hi_s = text.split("_", 1)
                lower, upper = float(lo_s), float(hi_s)
            else:
                upper, lower = float(text), None
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold '{spec}'.") from exc
    else:
        raise TypeError("rollout_is_threshold must be a float or a string threshold "
                        "specification.")
    if upper <= 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}.")
    if lower is not None:
        if lower <= 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}.")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound.")
    return upper, lower


def _rs_options(rollout_rs) -> list:
    """verl's criteria of a ``rollout_rs`` string (deduplicated, order kept)."""
    out = []
    for opt in (o.strip() for o in rollout_rs.split(",")):
        if not opt:
            continue
        if opt not in _RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {opt}. Must be one of "
                             f"{sorted(_RS_OPTIONS)}.")
        if opt not in out:
            out.append(opt)
    if not out:
        raise ValueError("rollout_rs must contain at least one valid option.")
    return out


def _parse_rollout_rs_thresholds(options: list, spec) -> dict:
    """verl's ``{option: (lower, upper)}`` (``lower`` None except for k1 options), with
    verl's errors."""
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    if isinstance(spec, (int, float)):
        raw = [str(spec)]
    elif isinstance(spec, str):
        raw = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or numeric value specifying "
                        "per-option thresholds.")
    if not raw:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value.")
    if len(raw) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold expects either one threshold shared by all "
                         f"options or exactly {len(options)} thresholds to match the provided "
                         f"rollout_rs options.")
    if len(raw) == 1:
        raw = raw * len(options)
    out = {}
    for opt, s in zip(options, raw):
        if opt.endswith("k1"):
            if "_" in s:
                lo_s, hi_s = s.split("_", 1)
            else:
                hi_s, lo_s = s, str(1.0 / float(s))  # verl's (unguarded) reciprocal
            try:
                lower, upper = float(lo_s), float(hi_s)
            except ValueError as exc:
                raise ValueError(f"Invalid numeric threshold '{s}' for option '{opt}'.") \
                    from exc
            if lower <= 0 or upper <= 0:
                raise ValueError(f"Thresholds for option '{opt}' must be positive, got {s}.")
            if lower > upper:
                raise ValueError(f"Thresholds for option '{opt}' must be lower <= upper, "
                                 f"got {s}.")
            out[opt] = (lower, upper)
        else:
            if "_" in s:
                raise ValueError(f"rollout_rs_threshold for option '{opt}' must provide a "
                                 f"single upper bound without '_'. Received '{s}'.")
            try:
                upper = float(s)
            except ValueError as exc:
                raise ValueError(f"Invalid numeric threshold '{s}' for option '{opt}'.") \
                    from exc
            if upper <= 0:
                raise ValueError(f"Threshold for option '{opt}' must be positive, got {s}.")
            out[opt] = (None, upper)
    return out


def _fin(x: float, top: float = _FMAX) -> float:
    return min(x, top)


def _rollout_op(old, rollout, mask, is_spec=None, rs_spec=None):
    """One :func:`rlkernels.rollout_correction` call: ``is_spec = (level, upper, lower)``
    (verl's ``rollout_is`` and parsed threshold; None: the op's defaults, weights unused),
    ``rs_spec`` verl's parsed rejection thresholds (None: no rejection)."""
    kw = {}
    if is_spec is not None:
        level, upper, lower = is_spec
        kw = dict(level=level, mode="truncate" if lower is None else "mask",
                  threshold_high=_fin(upper, _FMAX32),
                  threshold_low=None if lower is None else _fin(lower, _FMAX32))
    if rs_spec:
        kw["reject"] = tuple(rs_spec)
        kw["reject_threshold"] = {
            o: (_fin(lo), _fin(hi)) if o.endswith("k1") else _fin(hi)
            for o, (lo, hi) in rs_spec.items()}
    with torch.no_grad():
        return rlkernels.rollout_correction(old.detach(), rollout.detach(), mask, **kw)


def _scalars(metrics: dict, prefix: str = "") -> dict:
    """``{prefix + key: float}`` with one host transfer for every tensor value."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = (torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).tolist()
              if keys else [])
    got = dict(zip(keys, values))
    return {prefix + k: got[k] if k in got else float(v) for k, v in metrics.items()}


def _seq_stats(values, valid):
    """mean, unbiased std (0 for one sequence), max, min over the sequences ``valid``
    (verl's ``values[valid]`` statistics, without the host sync of boolean indexing)."""
    v = values
    n = valid.sum().to(v.dtype)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    mean = torch.where(valid, v, zero).sum() / n.clamp_min(1)
    var = torch.where(valid, (v - mean) ** 2, zero).sum() / (n - 1).clamp_min(1)
    std = torch.where(n > 1, var.sqrt(), zero)
    vmax = torch.where(valid, v, torch.full_like(v, -float("inf"))).max()
    vmin = torch.where(valid, v, torch.full_like(v, float("inf"))).min()
    return mean, std, vmax, vmin


def _clamped_std(x, mask, lo, hi):
    """verl's clamped masked standard deviation (0 unless more than one valid token)."""
    c = x.clamp(min=lo, max=hi)
    mean = _mmean(c, mask)
    std = torch.sqrt(torch.clamp(_mmean(c.square(), mask) - mean.square(), min=0.0))
    return torch.where(mask.sum() > 1, std, torch.zeros_like(std))


def _frac(cond: torch.Tensor) -> torch.Tensor:
    return cond.float().mean()


def _is_metrics(log_ratio, mask, weights, level, upper, lower, op) -> dict:
    """verl's ``compute_is_metrics`` (and ``rollout_is_oob_ratio``) from the op's weights and
    metrics; the rest in plain torch."""
    icepop = lower is not None
    lower_m = 1.0 / upper if lower is None else lower  # verl's default lower: 1 / upper
    seq_lr = _msum(log_ratio, mask, -1)
    if level == "token":
        raw = torch.exp(log_ratio.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)) * mask
        out = {"rollout_is_mean": op["weight_mean"],
               "rollout_is_ratio_fraction_high": op["frac_high"],
               "rollout_is_ratio_fraction_low": op["frac_low"] if icepop
               else _mmean((raw < lower_m).float(), mask),
               "rollout_is_max": op["weight_max"], "rollout_is_min": op["weight_min"]}
    else:
        raw = torch.exp(seq_lr.clamp(-_SAFETY_BOUND, _SAFETY_BOUND))[:, None] * mask
        dev = log_ratio.device
        log_hi = torch.log(torch.tensor(upper, device=dev))
        log_lo = torch.log(torch.tensor(lower_m, device=dev))
        out = {"rollout_is_max": torch.exp(seq_lr.max().clamp(max=_SAFETY_BOUND)),
               "rollout_is_min": torch.exp(seq_lr.min()),
               "rollout_is_mean": op["weight_mean"],
               "rollout_is_ratio_fraction_high": _frac(seq_lr > log_hi),
               "rollout_is_ratio_fraction_low": _frac(seq_lr < log_lo)}
    w = weights.clamp(min=0.0, max=upper)
    out["rollout_is_std"] = _clamped_std(weights, mask, 0.0, upper)
    out["rollout_is_eff_sample_size"] = 1.0 / _mmean((w / (_mmean(w, mask) + 1e-8)).square(),
                                                     mask)
    seq_w = _mmean(weights, mask, -1)
    std = seq_w.std() if seq_w.numel() > 1 else torch.zeros((), device=seq_w.device)
    raw_seq = _mmean(raw, mask, -1)
    out.update({"rollout_is_seq_mean": seq_w.mean(), "rollout_is_seq_std": std,
                "rollout_is_seq_max": seq_w.max(), "rollout_is_seq_min": seq_w.min(),
                "rollout_is_seq_max_deviation": (seq_w - 1.0).abs().max(),
                "rollout_is_seq_fraction_high": _frac(raw_seq > upper),
                "rollout_is_seq_fraction_low": _frac(raw_seq < lower_m)})
    if icepop:  # raw outside [lower, upper]: the op's two disjoint fractions
        out["rollout_is_oob_ratio"] = op["frac_high"] + op["frac_low"]
    return out


def _dist_masked_mean(x, m):
    """verl's ``distributed_masked_mean`` (an all-reduce of the sums)."""
    s, n = (x * m).sum(), m.sum()
    torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.SUM)
    return s / n


def _batch_normalize(weights, mask, level):
    """verl's ``rollout_is_batch_normalize``: ``(weights / mean, factor)`` where the mean
    (over valid tokens, or over non-empty sequences at ``"sequence"`` level; across ranks when
    torch.distributed is initialized) exceeds 1e-8, else ``(weights, 1.0)`` (on device)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    mf = mask.to(weights.dtype)
    if level == "token":
        mean = _dist_masked_mean(weights, mf) if dist else _mmean(weights, mask)
    else:
        seq_w = _mmean(weights, mask, -1)
        seq_m = (mask.sum(dim=-1) > 0).to(weights.dtype)
        mean = (_dist_masked_mean(seq_w, seq_m) if dist
                else (seq_w * seq_m).sum() / seq_m.sum().clamp_min(1e-8))
    ok = mean > 1e-8
    weights = torch.where(ok, weights / torch.where(ok, mean, torch.ones_like(mean)), weights)
    return weights, torch.where(ok, mean, torch.ones_like(mean))


def _weights_and_metrics(log_ratio, mask, rollout_is, upper, lower, batch_normalize, w, op):
    dtype = torch.result_type(log_ratio, mask)
    w = w.to(dtype)
    metrics = _is_metrics(log_ratio, mask, w, rollout_is, upper, lower, op)
    if batch_normalize:
        w, metrics["rollout_is_batch_norm_factor"] = _batch_normalize(w, mask, rollout_is)
    return w, metrics


def _check_is(rollout_is, rollout_is_threshold):
    if rollout_is not in {"token", "sequence"}:
        raise ValueError(f"Invalid rollout_is: {rollout_is}. Must be one of "
                         f"{ {'token', 'sequence'} }.")
    return _parse_rollout_is_threshold(rollout_is_threshold)


def compute_rollout_correction_weights(log_ratio: torch.Tensor, response_mask: torch.Tensor,
                                       rollout_is: str = "token",
                                       rollout_is_threshold=2.0,
                                       rollout_is_batch_normalize: bool = False
                                       ) -> Tuple[torch.Tensor, dict]:
    """verl's importance weights of ``log_ratio = log pi_train - log pi_rollout``:
    ``rollout_is="token"`` / ``"sequence"`` (:func:`rlkernels.rollout_correction` ``level``),
    a single ``rollout_is_threshold`` truncates (TIS, ``mode="truncate"``), ``"lower_upper"``
    zeroes weights outside the range (IcePop, ``mode="mask"``); 0 at padding. Returns
    ``(weights, metrics)`` with verl's ``rollout_is_*`` metrics (before the optional batch
    normalization to mean 1, whose factor is ``rollout_is_batch_norm_factor``)."""
    upper, lower = _check_is(rollout_is, rollout_is_threshold)
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    w, _, op = _rollout_op(log_ratio, torch.zeros_like(log_ratio), response_mask,
                           (rollout_is, upper, lower))
    w, metrics = _weights_and_metrics(log_ratio.detach(), response_mask, rollout_is, upper,
                                      lower, rollout_is_batch_normalize, w, op)
    return w, _scalars(metrics)


def _check_rs(rollout_rs, rollout_rs_threshold):
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple "
                         "options).")
    if rollout_rs_threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")


def _rs_metrics(log_ratio, mask, spec, keep, op) -> dict:
    """verl's ``compute_rs_metrics`` per criterion and its masked fractions in plain torch
    (the op returns the combined keep mask only); the combined fractions from the op."""
    lr = log_ratio.clamp(-_SAFETY_BOUND, _SAFETY_BOUND)
    k = {"k1": lambda: -lr, "k2": lambda: 0.5 * lr ** 2, "k3": lambda: torch.exp(lr) - 1.0 - lr}
    mb = mask.bool()
    seq_valid = mask.sum(dim=-1) > 0
    zero = torch.zeros((), dtype=lr.dtype, device=lr.device)
    out = {}
    for opt, (lower, upper) in spec.items():
        scope, est = opt.rsplit("_", 1)
        x = k[est]()
        k1 = est == "k1"
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        if scope == "token":
            stat, seq = x, _mmean(x, mask, -1)
        else:
            if scope == "seq_sum":
                seq = _msum(x, mask, -1)
            elif scope == "seq_mean":
                seq = _mmean(x, mask, -1)
            else:
                seq = x.masked_fill(~mb, -float("inf")).max(dim=-1).values
                seq = torch.where(seq == -float("inf"), zero, seq)
            stat = seq.unsqueeze(-1).expand_as(mask)
        passed = (stat >= lo) & (stat <= hi) if k1 else stat <= hi
        p = f"rollout_rs_{opt}"
        s_mean, s_std, s_max, s_min = _seq_stats(seq, seq_valid)
        n_seq = seq_valid.sum().clamp_min(1)
        s_high = (seq_valid & (seq > hi)).sum() / n_seq
        s_low = (seq_valid & (seq < lo)).sum() / n_seq
        if scope == "token":
            high = _mmean((stat > hi).float(), mask)
            low = _mmean((stat < lo).float(), mask) if k1 else 0.0
            vmax = stat.masked_fill(~mb, -float("inf")).max()
            vmin = stat.masked_fill(~mb, float("inf")).min()
        else:
            high, low, vmax, vmin = s_high, s_low if k1 else 0.0, s_max, s_min
        out.update({f"{p}_mean": _mmean(stat, mask), f"{p}_max": vmax, f"{p}_min": vmin,
                    f"{p}_fraction_high": high, f"{p}_fraction_low": low,
                    f"{p}_std": _clamped_std(stat, mask, lo if k1 else 0.0, hi),
                    f"{p}_seq_mean": s_mean, f"{p}_seq_std": s_std, f"{p}_seq_max": s_max,
                    f"{p}_seq_min": s_min,
                    f"{p}_seq_max_deviation": torch.where(seq_valid, seq.abs(), zero).max(),
                    f"{p}_seq_fraction_high": s_high})
        if k1:
            out[f"{p}_seq_fraction_low"] = s_low
        out[f"{p}_masked_fraction"] = _mmean(1 - passed.to(lr.dtype), mask)
        seq_rejected = (~passed & mb).any(dim=-1) & seq_valid
        out[f"{p}_seq_masked_fraction"] = seq_rejected.sum() / n_seq
    # the op: over non-empty sequences; verl: over all B rows
    nonempty = mb.any(dim=-1).sum() / mask.shape[0]
    out["rollout_rs_masked_fraction"] = op["rejected_frac"]
    out["rollout_rs_seq_masked_fraction"] = op["rejected_seq_frac"] * nonempty
    return out


def _rejected(mask, keep):
    """verl's ``(response_mask * final_mask).to(response_mask.dtype)``."""
    return mask & keep if mask.dtype == torch.bool else (mask * keep).to(mask.dtype)


def compute_rollout_rejection_mask(log_ratio: torch.Tensor, response_mask: torch.Tensor,
                                   rollout_rs: str = "token_k1", rollout_rs_threshold=None
                                   ) -> Tuple[torch.Tensor, dict]:
    """verl's rejection sampling: ``response_mask`` with 0 wherever a ``rollout_rs``
    criterion fails (comma-separated ``token_k{1,2,3}``, ``seq_sum_k{1,2,3}``,
    ``seq_mean_k{1,2,3}``, ``seq_max_k{2,3}``; thresholds as verl: one shared or one per
    criterion, ``"lower_upper"`` ratio bounds for k1): the keep mask of
    :func:`rlkernels.rollout_correction` ``reject=``. Returns ``(mask, metrics)`` with verl's
    ``rollout_rs_*`` metrics (an empty batch: ``(response_mask, {})``)."""
    _check_rs(rollout_rs, rollout_rs_threshold)
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    options = _rs_options(rollout_rs)
    spec = _parse_rollout_rs_thresholds(options, rollout_rs_threshold)
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    _, keep, op = _rollout_op(log_ratio, torch.zeros_like(log_ratio), response_mask,
                              rs_spec=spec)
    metrics = _rs_metrics(log_ratio.detach(), response_mask, spec, keep, op)
    return _rejected(response_mask, keep), _scalars(metrics)


def _offpolicy_metrics(old, rollout, mask, op) -> dict:
    """verl's ``compute_offpolicy_metrics``: kl, k3_kl, chi2_token from the op (chi2_seq and
    log_ppl_diff too, rescaled from the op's mean over non-empty sequences to verl's mean over
    all B rows, where an empty row counts 0); the perplexities in plain torch."""
    mean_old = _mmean(old, mask, -1)
    out = {"training_ppl": torch.exp(-mean_old).mean(), "training_log_ppl": (-mean_old).mean()}
    if rollout is None:
        return out
    nonempty = mask.bool().any(dim=-1).sum() / mask.shape[0]
    mean_roll = _mmean(rollout, mask, -1)
    diff = mean_roll - mean_old
    out.update({"kl": op["k1"], "k3_kl": op["k3"], "rollout_ppl": torch.exp(-mean_roll).mean(),
                "rollout_log_ppl": (-mean_roll).mean(),
                "log_ppl_diff": op["log_ppl_diff"] * nonempty,
                "log_ppl_abs_diff": diff.abs().mean(), "log_ppl_diff_max": diff.max(),
                "log_ppl_diff_min": diff.min(), "ppl_ratio": torch.exp(diff).mean(),
                "chi2_token": op["chi2_token"], "chi2_seq": op["chi2_seq"] * nonempty})
    return out


def compute_offpolicy_metrics(old_log_prob: torch.Tensor,
                              rollout_log_prob: Optional[torch.Tensor],
                              response_mask: torch.Tensor) -> dict:
    """verl's off-policy diagnostics (no prefix): ``training_ppl``, ``training_log_ppl`` and,
    with ``rollout_log_prob``, ``kl``, ``k3_kl``, ``rollout_ppl``, ``rollout_log_ppl``,
    ``log_ppl_diff`` (``_abs_diff``, ``_max``, ``_min``), ``ppl_ratio``, ``chi2_token``,
    ``chi2_seq``."""
    assert response_mask.any(), "Expected at least one valid token in response_mask"
    old = old_log_prob.detach()
    op = None
    if rollout_log_prob is not None:
        _, _, op = _rollout_op(old, rollout_log_prob, response_mask)
        rollout_log_prob = rollout_log_prob.detach()
    return _scalars(_offpolicy_metrics(old, rollout_log_prob, response_mask, op))


def compute_rollout_corr_metrics_from_logprobs(log_prob: torch.Tensor,
                                               rollout_log_prob: torch.Tensor,
                                               response_mask: torch.Tensor) -> dict:
    """:func:`compute_offpolicy_metrics` of the current ``log_prob``, keys prefixed with
    ``"rollout_corr/"``."""
    metrics = compute_offpolicy_metrics(log_prob, rollout_log_prob, response_mask)
    return {f"rollout_corr/{k}": v for k, v in metrics.items()}


def compute_rollout_correction_and_rejection_mask(
        old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
        response_mask: torch.Tensor, rollout_is: Optional[str] = None,
        rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False,
        rollout_rs: Optional[str] = None, rollout_rs_threshold=None):
    """verl's unified rollout correction, in one :func:`rlkernels.rollout_correction` call:
    ``(DataProto with "rollout_is_weights" or None, response_mask with rejection applied,
    metrics)``; the metrics are those of :func:`compute_rollout_correction_weights`,
    :func:`compute_rollout_rejection_mask` and :func:`compute_offpolicy_metrics`, prefixed
    with ``"rollout_corr/"``. IS is off when ``rollout_is`` or its threshold is None,
    rejection when ``rollout_rs`` is None."""
    if not response_mask.any():
        raise ValueError(_NO_VALID)
    if old_log_prob.shape != rollout_log_prob.shape:
        raise ValueError(f"old_log_prob shape {old_log_prob.shape} does not match "
                         f"rollout_log_prob shape {rollout_log_prob.shape}.")
    if old_log_prob.shape != response_mask.shape:
        raise ValueError(f"log_prob shape {old_log_prob.shape} does not match response_mask "
                         f"shape {response_mask.shape}.")
    do_is = rollout_is is not None and rollout_is_threshold is not None
    is_spec = rs_spec = None
    if do_is:
        is_spec = (rollout_is, *_check_is(rollout_is, rollout_is_threshold))
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs "
                             "is enabled. Set rollout_rs_threshold to the desired threshold "
                             "value.")
        _check_rs(rollout_rs, rollout_rs_threshold)
        rs_spec = _parse_rollout_rs_thresholds(_rs_options(rollout_rs), rollout_rs_threshold)
    old, roll = old_log_prob.detach(), rollout_log_prob.detach()
    w, keep, op = _rollout_op(old, roll, response_mask, is_spec, rs_spec)
    log_ratio = old - roll
    metrics = {}
    weights = None
    if do_is:
        weights, metrics = _weights_and_metrics(log_ratio, response_mask, is_spec[0],
                                                is_spec[1], is_spec[2],
                                                rollout_is_batch_normalize, w, op)
    mask = response_mask.clone()
    if rs_spec is not None:
        metrics.update(_rs_metrics(log_ratio, response_mask, rs_spec, keep, op))
        mask = _rejected(response_mask, keep)
    metrics.update(_offpolicy_metrics(old, roll, response_mask, op))
    proto = None
    if weights is not None:
        from verl.protocol import DataProto
        proto = DataProto.from_dict(tensors={"rollout_is_weights": weights})
    return proto, mask, _scalars(metrics, "rollout_corr/")


# ========================================================================================= patch

_TARGETS = {
    "verl.utils.torch_functional": ("logprobs_from_logits", "entropy_from_logits"),
    "verl.trainer.ppo.core_algos": ("kl_penalty", "agg_loss", "compute_policy_loss",
                                    "compute_policy_loss_vanilla", "compute_policy_loss_cispo",
                                    "compute_policy_loss_gspo", "compute_policy_loss_gpg",
                                    "compute_policy_loss_sapo", "compute_policy_loss_clip_cov",
                                    "compute_policy_loss_kl_cov", "compute_policy_loss_geo_mean",
                                    "compute_policy_loss_dro", "compute_policy_loss_dppo_tv",
                                    "compute_policy_loss_dppo_kl", "compute_gae_advantage_return",
                                    "compute_grpo_outcome_advantage",
                                    "compute_grpo_vectorized_outcome_advantage",
                                    "compute_rloo_outcome_advantage",
                                    "compute_rloo_vectorized_outcome_advantage",
                                    "compute_opo_outcome_advantage",
                                    "compute_gpg_outcome_advantage",
                                    "compute_grpo_passk_outcome_advantage",
                                    "compute_reinforce_plus_plus_baseline_outcome_advantage",
                                    "compute_gdpo_outcome_advantage",
                                    "compute_reinforce_plus_plus_outcome_advantage",
                                    "compute_remax_outcome_advantage"),
    "verl.trainer.ppo.rollout_corr_helper": ("compute_rollout_correction_weights",
                                             "compute_rollout_rejection_mask",
                                             "compute_rollout_correction_and_rejection_mask",
                                             "compute_offpolicy_metrics",
                                             "compute_rollout_corr_metrics_from_logprobs"),
}
# modules that older verl versions lack (verl < 0.6 has no rollout_corr_helper): skipped when
# absent, where the rest of verl is patched
_OPTIONAL = frozenset({"verl.trainer.ppo.rollout_corr_helper"})


def _registries():
    import sys
    mod = sys.modules.get("verl.trainer.ppo.core_algos")
    return [getattr(mod, n) for n in ("POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY")
            if isinstance(getattr(mod, n, None), dict)]


def _returns_metrics_dict(fn) -> bool:
    import inspect
    try:
        ann = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return "dict" in str(ann).lower()


def patch() -> None:
    """Replace verl's functions (module attributes in every imported ``verl.*`` module and the
    entries of its policy-loss / advantage registries) with these. Raises ``ImportError`` when
    verl is not importable. Idempotent. The vanilla loss returns verl's metrics dict when
    verl's does (:func:`compute_policy_loss_vanilla_metrics`). Numerical results do not depend
    on whether ``patch()`` ran: the version-dependent formulas follow :data:`VERL_VERSION`."""
    import importlib
    if _patcher.active:
        return
    here = globals()
    pairs = {}
    for modname, names in _TARGETS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if modname not in _OPTIONAL or exc.name != modname:
                raise
            continue
        for name in names:
            if hasattr(mod, name):
                orig = getattr(mod, name)
                repl = here[name]
                if name == "compute_policy_loss_vanilla" and _returns_metrics_dict(orig):
                    repl = compute_policy_loss_vanilla_metrics
                pairs[name] = (orig, repl)
    _patcher.patch(pairs, _registries)


def unpatch() -> None:
    """Restore verl's original functions exactly. A no-op when not patched."""
    _patcher.unpatch(_registries)


def is_patched() -> bool:
    return _patcher.active
