"""Advantage ops: functions that read rewards (and values), SPEC section 3.2.

Each is declared in the op table (:mod:`rlkernels.ops._table`) and dispatched to a backend
like the vocabulary ops (SPEC section 2: every op takes ``backend``):

* :func:`group_advantages` (GRPO-family baselines), :func:`gae` and
  :func:`discounted_returns` take detached inputs: advantages and returns are targets, so the
  ops have no autograd formula. The ``torch`` backend of the last two is a loop over ``T``
  (``T`` small launches); ``triton`` runs one launch, a chunked scan per row.
* :func:`masked_whiten` is differentiable: a forward custom op that saves 4 statistics and a
  backward custom op (the formula is in the reference's ``masked_whiten_backward``).

None of them synchronises with the host (data checks such as NaN rewards run only in debug
mode, :func:`rlkernels.set_debug`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks
from ..reference import advantage as _ref
from ._common import out_dtype
from ._table import Backward, Op

Tensor = torch.Tensor
_FAMILY = "advantage"

METHODS = _ref.METHODS

# Masks may be bool, integer (attention masks are often int64) or float.
# masked_whiten_forward's saved statistics: (count, mean, rstd, sum of w (v - mean))
_WHITEN_STATS = 4

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                *_checks.FLOAT_DTYPES)


# ========================================================================= group_advantages

def _per_reward(a) -> Tensor:
    """The fake of a ``rewards``-shaped output (fp32, fp64 for fp64 rewards)."""
    return a.rewards.new_empty(a.rewards.shape, dtype=out_dtype(a.rewards.dtype))


GROUP_ADVANTAGES = Op(
    "group_advantages(Tensor rewards, Tensor? group_index, int group_size, str method, "
    "float eps, bool unbiased, Tensor? mask, Tensor? reward_weights, bool norm_by_std, "
    "float whiten_eps, str backend) -> (advantages)",
    _FAMILY, fake=lambda a: a.rewards.new_empty(a.rewards.shape[:1],
                                                dtype=out_dtype(a.rewards.dtype)),
    eager=True)


def _check_no_nan(name: str, x: Tensor) -> None:
    """Debug-mode only: ``x`` holds no NaN (costs a host synchronisation)."""
    if not _checks.debug_enabled() or x.numel() == 0:
        return
    bad = torch.isnan(x)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected no NaN values, got {int(bad.sum())} NaN value(s) "
                         f"(first at index {first})")


def group_advantages(rewards: Tensor, *, group_size: Optional[int] = None,
                     group_index: Optional[Tensor] = None, method: str = "grpo",
                     eps: float = 1e-6, unbiased: bool = True, mask: Optional[Tensor] = None,
                     reward_weights=None, norm_by_std: bool = True, whiten_eps: float = 1e-8,
                     backend: Optional[str] = None) -> Tensor:
    """Advantage of each reward relative to the other rewards of its group.

    For reward ``r`` in group ``g`` with ``n_g`` members, mean ``mean_g``, sum ``sum_g`` and
    standard deviation ``std_g``:

    * ``"grpo"``:      ``(r - mean_g) / (std_g + eps)``
    * ``"dr_grpo"``:   ``r - mean_g`` (Dr. GRPO: no division by the std)
    * ``"rloo"``:      ``r - (sum_g - r) / (n_g - 1)``, i.e. ``r`` minus the mean of the *other*
      members (leave-one-out baseline; equals ``n_g / (n_g - 1) (r - mean_g)``)
    * ``"batch_std"``: ``(r - mean_g) / (std_B + eps)``, ``std_B`` over the whole batch
      (group mean as the baseline, batch std as the scale)

    verl's other outcome estimators (``verl.trainer.ppo.core_algos``, docs/math.md), with
    ``L_i`` the number of valid (non-zero) tokens of row ``i`` of ``mask``:

    * ``"grpo_vectorized"``, ``"rloo_vectorized"``: verl's names of ``"grpo"`` / ``"rloo"``.
    * ``"opo"``: ``r - sum_g(L r) / sum_g(L)`` (baseline weighted by response length; a group
      without any valid token gets 0). Needs ``mask``.
    * ``"gpg"``: ``(B / max(m, 1)) (r - mean_g)``, ``m`` the number of non-zero rewards in the
      batch (verl's ``alpha``; ``f_norm = 1``).
    * ``"grpo_passk"``: only the best member of a group gets ``(r_max - r_2nd) / (std_g +
      eps)`` (Pass@k training), the others 0; a tie for the best gives 0 to every member.
    * ``"reinforce_plus_plus_baseline"``: ``d = r - mean_g``, then whitened over the batch
      with token weights: ``(d - mu) / sqrt(var + whiten_eps)``, ``mu = sum L d / sum L``,
      ``var = sum L (d - mu)^2 / (sum L - 1)`` (verl's ``masked_whiten`` of ``d`` broadcast
      over the valid tokens). Needs ``mask``.
    * ``"gdpo"``: ``rewards [B, K]`` holds K reward components; each is normalized as
      ``"grpo"`` in its group, the results summed with ``reward_weights`` (default 1 each) in
      component order, and the sum whitened as ``"reinforce_plus_plus_baseline"``'s ``d``.
      Needs ``mask``.

    ``norm_by_std=False`` (verl's ``norm_adv_by_std_in_grpo``) drops the ``/ (std_g + eps)``
    of ``"grpo"`` (= ``"dr_grpo"``), ``"grpo_passk"`` and ``"gdpo"``. Outputs stay ``[B]`` (one
    advantage per response): broadcast them over tokens with ``adv[:, None] * mask``, which
    is verl's ``[B, T]`` output (``policy_loss`` takes ``[B]`` advantages as they are).
    Where rlkernels differs from verl: a group of one member gets 0 (verl: baseline 0, std 1,
    or an error for ``grpo_passk``), before the whitening of the two whitened methods;
    whitening denominators are clamped instead of raising on fewer than 2 valid tokens.

    ``unbiased`` picks the ``n - 1`` (default, like ``torch.std``) or ``n`` denominator in
    every std. A group of one member gets advantage exactly 0 for every method (``r - r``: NaN
    only if ``r`` is not finite); with ``batch_std`` and ``B == 1`` that is the only group.
    A group whose rewards are all equal gets ``0 / (0 + eps) = 0`` with ``"grpo"`` (NaN if
    ``eps == 0``).
    Every method is one launch of the group kernel, plus a batch pass where the method needs
    the whole batch first (cuda: ``batch_std``, ``gpg``; both backends: the whitening of
    ``reinforce_plus_plus_baseline`` and ``gdpo``); no host synchronisation.

    Groups, exactly one of:

    * ``group_size``: contiguous groups of equal size (``rewards[0:S]`` is group 0, ...), the
      usual layout of ``n`` completions per prompt; ``B`` must be a multiple of it.
    * ``group_index``: int32/int64 ``[B]`` ids (prompt ids, or strata for stratified
      normalization), in any order, any group sizes, any values (negative included).

    Both give bit-identical results for the same grouping. Statistics are computed in two
    passes (mean first, then squared deviations), in a fixed order over each group's members
    (the order they have in ``rewards``), so results are deterministic and batch invariant: a
    group's advantages do not depend on the other groups in the call (except through
    ``std_B`` with ``"batch_std"``, ``alpha`` with ``"gpg"`` and the batch whitening of
    ``"reinforce_plus_plus_baseline"`` / ``"gdpo"``). No host synchronisation, no
    data-dependent shapes.

    NaN rewards raise ``ValueError`` in debug mode (:func:`rlkernels.set_debug`); otherwise a
    NaN makes its own group NaN and leaves the other groups untouched (with ``"batch_std"`` it
    makes ``std_B`` NaN, hence every group of two or more members; with the whitened methods
    the batch statistics, hence every advantage).

    Args:
        rewards: ``[B]`` bf16/fp16/fp32/fp64 (``B = 0`` gives an empty result); ``[B, K]``
            reward components with ``"gdpo"`` (``[B]``: one component).
        group_size: int ``>= 1``, or ``None`` when ``group_index`` is given.
        group_index: int32/int64 ``[B]`` on the device of ``rewards``, or ``None``.
        method: one of :data:`METHODS` (above).
        eps: finite ``>= 0``, added to the std (``"grpo"``, ``"batch_std"``,
            ``"grpo_passk"``, ``"gdpo"``).
        unbiased: Bessel's correction in every std and whitening variance.
        mask: ``[B, T]`` response mask (bool, integer or float; non-zero is a valid token),
            needed by ``"opo"``, ``"reinforce_plus_plus_baseline"`` and ``"gdpo"``; the other
            methods do not read it.
        reward_weights: ``"gdpo"`` only: ``K`` weights (a float tensor on the device of
            ``rewards``, or a sequence of numbers), default all 1.
        norm_by_std: divide by the group std (see above).
        whiten_eps: finite ``>= 0``, added to the variance of the batch whitening.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or ``None`` (process default).

    Returns:
        ``[B]`` fp32 (fp64 for fp64 rewards), computed in that precision. Not differentiable:
        ``rewards`` is detached (advantages are constants in the policy gradient).
    """
    _checks.choice("method", method, METHODS)
    _checks.tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES,
                   ndim=None if method == "gdpo" else 1)
    if rewards.dim() not in (1, 2):
        raise ValueError("rewards: expected a 1-d tensor [B] or, with method='gdpo', [B, K] "
                         f"reward components, got shape {tuple(rewards.shape)}")
    b = rewards.shape[0]
    if (group_size is None) == (group_index is None):
        got = "both" if group_size is not None else "neither"
        raise ValueError("group_size, group_index: expected exactly one of them (contiguous "
                         f"groups of group_size members, or a group id per reward), got {got}")
    if group_size is not None:
        _checks.integer("group_size", group_size, lo=1)
        if b % group_size != 0:
            raise ValueError(f"group_size: expected a divisor of the batch size B={b} "
                             f"(contiguous groups of equal size), got {group_size}")
        size = group_size
    else:
        _checks.indices("group_index", group_index)
        _checks.shape("group_index", group_index, (b,), "one group id per reward")
        _checks.same_device("rewards", rewards, group_index=group_index)
        size = 0
    eps = _checks.positive("eps", eps, allow_zero=True)
    _checks.flag("unbiased", unbiased)
    _checks.flag("norm_by_std", norm_by_std)
    if not norm_by_std and method not in _ref.STD_METHODS:
        raise ValueError(f"norm_by_std: expected True with method={method!r} (only "
                         f"{', '.join(repr(m) for m in _ref.STD_METHODS)} divide by a group "
                         "std), got False")
    whiten_eps = _checks.positive("whiten_eps", whiten_eps, allow_zero=True)
    if mask is not None:
        _checks.tensor("mask", mask, dtypes=_MASK_DTYPES, ndim=2)
        if mask.shape[0] != b:
            raise ValueError(f"mask: expected shape ({b}, T) (one row per reward), got "
                             f"{tuple(mask.shape)}")
        _checks.same_device("rewards", rewards, mask=mask)
    elif method in _ref.MASK_METHODS:
        raise ValueError(f"mask: expected a [B, T] response mask with method={method!r} (it "
                         "weighs responses by their valid tokens), got None")
    reward_weights = _reward_weights(reward_weights, method, rewards)
    _check_no_nan("rewards", rewards)
    name = GROUP_ADVANTAGES.resolve(backend, rewards)
    return GROUP_ADVANTAGES(rewards, group_index, size, method, eps, unbiased, mask,
                            reward_weights, norm_by_std, whiten_eps, name)


def _reward_weights(weights, method: str, rewards: Tensor) -> Optional[Tensor]:
    """``gdpo``'s component weights as a ``[K]`` tensor in the math dtype (or None)."""
    if weights is None:
        return None
    if method != "gdpo":
        raise ValueError(f"reward_weights: expected None with method={method!r} (only 'gdpo' "
                         f"weighs reward components), got {type(weights).__name__}")
    k = rewards.shape[1] if rewards.dim() == 2 else 1
    cdt = out_dtype(rewards.dtype)
    if not isinstance(weights, Tensor):
        try:
            weights = torch.tensor([float(w) for w in weights], dtype=cdt)
        except (TypeError, ValueError):
            raise TypeError("reward_weights: expected a float tensor or a sequence of numbers, "
                            f"got {weights!r}") from None
        weights = weights.to(rewards.device)
    _checks.tensor("reward_weights", weights, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    _checks.shape("reward_weights", weights, (k,), "one weight per reward component")
    _checks.same_device("rewards", rewards, reward_weights=weights)
    return weights.to(cdt)


# ============================================================================ masked_whiten

def _check_mask(name: str, mask, ref_name: str, ref: Tensor) -> Tensor:
    _checks.tensor(name, mask, dtypes=_MASK_DTYPES)
    _checks.shape(name, mask, ref.shape, f"the shape of {ref_name}")
    _checks.same_device(ref_name, ref, **{name: mask})
    return mask


MASKED_WHITEN = Op(
    "masked_whiten(Tensor values, Tensor mask, bool shift_mean, float eps, bool unbiased, "
    "str backend) -> (out, stats)",
    _FAMILY,
    fake=lambda a: (a.values.new_empty(a.values.shape, dtype=out_dtype(a.values.dtype)),
                    a.values.new_empty((_WHITEN_STATS,), dtype=out_dtype(a.values.dtype))),
    differentiable=("values",), nondiff=("stats",), saved=("values", "mask", "stats"),
    backward=Backward(("grad_out", "values", "mask", "stats", "shift_mean", "unbiased"),
                      grads=("values",)),
    contiguous_grads=True, eager=True)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  unbiased: bool = True, backend: Optional[str] = None) -> Tensor:
    """Whiten ``values`` with the mean and variance of its masked elements (whole tensor).

    With ``w = mask`` (bool/int masks count as 0/1; float masks act as weights) and
    ``c = sum(w)``::

        mean = sum(w v) / max(c, 1)
        var  = sum(w (v - mean)^2) / max(c - 1, 1)      # max(c, 1) when not unbiased
        out  = (v - mean) * rsqrt(var + eps)            # + mean when shift_mean=False

    Like TRL's and verl's ``masked_whiten``, every position is transformed: masked positions
    are *not* zeroed (multiply by the mask if you need that), but their values take no part in
    the statistics (a NaN there stays in its own position). TRL and verl raise when fewer than
    two elements are selected; that test needs the data (a host synchronisation), so here the
    clamped denominators keep the result finite instead: with no selected element
    ``mean = var = 0`` (``out = v / sqrt(eps)``), with one ``var = 0``.

    Args:
        values: float tensor of any shape (bf16/fp16/fp32/fp64).
        mask: same shape, bool, integer or float, same device.
        shift_mean: ``False`` adds the mean back (scale only, as for PPO rewards).
        eps: finite ``>= 0``, added to the variance.
        unbiased: Bessel's correction (``c - 1``) in the variance.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or ``None`` (process default).

    Returns:
        Same shape, fp32 (fp64 for fp64 values). Differentiable w.r.t. ``values``; traces
        under ``torch.compile``.
    """
    _checks.tensor("values", values, dtypes=_checks.FLOAT_DTYPES)
    _check_mask("mask", mask, "values", values)
    _checks.flag("shift_mean", shift_mean)
    eps = _checks.positive("eps", eps, allow_zero=True)
    _checks.flag("unbiased", unbiased)
    name = MASKED_WHITEN.resolve(backend, values)
    return MASKED_WHITEN(values, mask, shift_mean, eps, unbiased, name)[0]


# ====================================================================== gae / discounted returns

def _check_sequences(rewards, mask, **others) -> None:
    _checks.tensor("rewards", rewards, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    for name, x in others.items():
        _checks.tensor(name, x, dtypes=_checks.FLOAT_DTYPES)
        _checks.shape(name, x, rewards.shape, "the shape of rewards, [B, T]")
        _checks.same_device("rewards", rewards, **{name: x})
    _check_mask("mask", mask, "rewards", rewards)


def _gae_fake(a):
    cdt = torch.float64 if torch.float64 in (a.rewards.dtype, a.values.dtype) else torch.float32
    return (a.rewards.new_empty(a.rewards.shape, dtype=cdt),
            a.rewards.new_empty(a.rewards.shape, dtype=cdt))


GAE = Op(
    "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, str backend) "
    "-> (advantages, returns)",
    _FAMILY, fake=_gae_fake, eager=True)

DISCOUNTED_RETURNS = Op(
    "discounted_returns(Tensor rewards, Tensor mask, float gamma, str backend) -> "
    "(returns)",
    _FAMILY, fake=_per_reward, eager=True)

# discounted_returns with a baseline (ReMax) and / or whitening (REINFORCE++)
DISCOUNTED_ADVANTAGES = Op(
    "discounted_advantages(Tensor rewards, Tensor mask, Tensor? baseline, float gamma, "
    "bool whiten, float whiten_eps, bool unbiased, str backend) -> (advantages, returns)",
    _FAMILY, fake=lambda a: (_per_reward(a), _per_reward(a)), eager=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
        lam: float = 1.0, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Generalized advantage estimation (GAE) with masked positions skipped, as verl's
    ``compute_gae_advantage_return`` does for multi-turn rollouts.

    A reverse scan over ``T`` from ``nextvalue = lastgae = 0``; at each ``t``::

        delta     = r_t + gamma * nextvalue - v_t
        lastgae_  = delta + gamma * lam * lastgae
        nextvalue = m_t ? v_t      : nextvalue
        lastgae   = m_t ? lastgae_ : lastgae

    so a masked position (``mask == 0``: padding, or tool/observation tokens between turns) is
    transparent: the scan carries its state across it and the next valid position bootstraps
    from the next *valid* value. ``advantages_t = lastgae`` and ``returns = advantages + values``;
    both are then exactly 0 at masked positions (verl's loop leaves its carried ``lastgae``
    there, i.e. the advantage of the next valid position:
    ``rlkernels.integrations.verl.compute_gae_advantage_return`` reproduces verl; see
    docs/math.md). The mask is read as valid/invalid (non-zero is valid), so NaN or garbage in
    masked positions never leaks into valid ones. No whitening: call :func:`masked_whiten` on
    the advantages if you want it (verl does).

    Args:
        rewards: ``[B, T]`` float (token-level rewards, usually the score on the last valid
            token minus a KL penalty).
        values: ``[B, T]`` float, the critic's values.
        mask: ``[B, T]`` bool, integer or float (0/1), same device.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.
        backend: ``"torch"`` (a loop of ``T`` small steps), ``"triton"`` (one launch),
            ``"cuda"``, ``"auto"`` or ``None`` (process default).

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` fp32 (fp64 if ``rewards`` or ``values`` is
        fp64). Not differentiable: the inputs are detached (advantages and returns are
        targets). No host synchronisation.
    """
    _check_sequences(rewards, mask, values=values)
    gamma = _checks.number("gamma", gamma, lo=0.0, hi=1.0)
    lam = _checks.number("lam", lam, lo=0.0, hi=1.0)
    name = GAE.resolve(backend, rewards)
    return GAE(rewards, values, mask, gamma, lam, name)


def discounted_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 1.0,
                       baseline: Optional[Tensor] = None, whiten: bool = False,
                       whiten_eps: float = 1e-8, unbiased: bool = True,
                       backend: Optional[str] = None):
    """Discounted return-to-go ``G_t = r_t + gamma * G_next`` with masked positions skipped.

    ``G_next`` is the return at the next valid position (0 after the last one); masked
    positions (``mask == 0``) carry the return through unchanged and output exactly 0 (not the
    carried value; docs/math.md says how to get it). Equals
    the returns of :func:`gae` with ``values = 0`` and ``lam = 1`` (REINFORCE / ReMax style
    returns).

    With ``baseline`` and / or ``whiten=True`` it also returns advantages (verl's token-level
    estimators, docs/math.md), exactly 0 at masked positions, at valid ones:

    * ``baseline [B]`` (ReMax: the reward of the greedy response): ``A_t = G_t - baseline``
      (verl ``remax``, with ``gamma = 1``);
    * ``whiten=True`` (REINFORCE++: verl ``reinforce_plus_plus``): ``A`` (``G``, or ``G -
      baseline``) whitened over every valid position of the batch,
      ``(A - mean) / sqrt(var + whiten_eps)``, ``var`` with Bessel's correction when
      ``unbiased`` (the clamped denominators of :func:`masked_whiten`).

    One launch (two with ``whiten``: the scan with per-row statistics, then the batch
    combine), no host synchronisation.

    Args:
        rewards: ``[B, T]`` float.
        mask: ``[B, T]`` bool, integer or float (0/1; non-zero is valid), same device.
        gamma: discount in ``[0, 1]``.
        baseline: ``[B]`` float on the device of ``rewards``, or ``None``.
        whiten: whiten the advantages over the batch.
        whiten_eps: finite ``>= 0``, added to the variance.
        unbiased: Bessel's correction in the variance.
        backend: as for :func:`gae`.

    Returns:
        ``[B, T]`` fp32 (fp64 for fp64 rewards); with ``baseline`` or ``whiten``:
        ``(advantages, returns)``. Not differentiable: ``rewards`` is detached.
    """
    _check_sequences(rewards, mask)
    gamma = _checks.number("gamma", gamma, lo=0.0, hi=1.0)
    _checks.flag("whiten", whiten)
    _checks.flag("unbiased", unbiased)
    whiten_eps = _checks.positive("whiten_eps", whiten_eps, allow_zero=True)
    if baseline is not None or whiten:
        if baseline is not None:
            _checks.tensor("baseline", baseline, dtypes=_checks.FLOAT_DTYPES, ndim=1)
            _checks.shape("baseline", baseline, rewards.shape[:1], "one baseline per row")
            _checks.same_device("rewards", rewards, baseline=baseline)
        name = DISCOUNTED_ADVANTAGES.resolve(backend, rewards)
        return DISCOUNTED_ADVANTAGES(rewards, mask, baseline, gamma, whiten, whiten_eps,
                                     unbiased, name)
    name = DISCOUNTED_RETURNS.resolve(backend, rewards)
    return DISCOUNTED_RETURNS(rewards, mask, gamma, name)


__all__ = ["group_advantages", "masked_whiten", "gae", "discounted_returns"]
