"""The settings of a clipped policy loss, validated once and carried as one frozen value.

Custom ops only take primitive arguments, so :meth:`PolicyOptions.encode` turns the options
into a mode string and a list of floats (constants for ``torch.compile``), and
:meth:`PolicyOptions.decode` turns them back inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import _checks

LOSSES = ("ppo", "cispo", "reinforce", "sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv",
          "dppo_kl", "dro", "vespo", "luspo")
RATIO_LEVELS = ("token", "sequence")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# the estimators of kl_penalty (elementwise on logp and ref_logp) ...
PENALTY_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+")
# ... and those of policy_loss, which also has the ratio r = pi / pi_old: "k3_is" is TRL's
# use_bias_correction_kl (r k3, r differentiable), "k3_is_sg" the same with sg(r)
KL_ESTIMATORS = PENALTY_ESTIMATORS + ("k3_is", "k3_is_sg")

# losses whose ratio may be GSPO's sequence ratio (the others define their own ratio)
SEQUENCE_RATIO_LOSSES = ("ppo", "cispo", "reinforce", "sapo", "luspo")
# the aggregation of ``agg=None``: the one the loss's reference implementation uses (verl's
# sapo forces seq-mean-token-mean, verl's geo_mean takes the mean over sequences, TRL's luspo
# sums each sequence's tokens), token-mean for the others
DEFAULT_AGGS = {"sapo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean",
                "luspo": "seq-mean-token-sum"}
# the loss-specific options: (name, the loss that takes it, default)
LOSS_OPTIONS = (("tau_pos", "sapo", 1.0), ("tau_neg", "sapo", 1.05),
                ("clip_cov_ratio", "clip_cov", 2e-4), ("clip_cov_lb", "clip_cov", 1.0),
                ("clip_cov_ub", "clip_cov", 5.0), ("kl_cov_ratio", "kl_cov", 2e-4),
                ("kl_cov_coef", "kl_cov", 0.1), ("dro_beta", "dro", None),
                ("vespo_k_pos", "vespo", 2.0), ("vespo_lambda_pos", "vespo", 3.0),
                ("vespo_k_neg", "vespo", 3.0), ("vespo_lambda_neg", "vespo", 2.0))
# dppo_*: the truncation of sg(min(r, C)) when dual_clip is None (verl's own fallback)
DPPO_TRUNCATION = 20.0

# the metrics of a policy loss, in the order of the kernels' metric vector
METRICS = ("clipfrac", "clipfrac_high", "clipfrac_low", "dual_clipfrac", "approx_kl",
           "ratio_mean", "ratio_max", "kl", "entropy")


@dataclass(frozen=True)
class PolicyOptions:
    loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    delta: Optional[float] = None
    ratio_level: str = "token"
    agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    log_ratio_clamp: float = 20.0
    # cispo: clamp the ratio below at 1 - clip_low too (verl's form; TRL's has no lower bound)
    cispo_clip_low: bool = False
    # loss-specific options (LOSS_OPTIONS), resolved to their defaults; dro_beta 0 = unset
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 0.1
    dro_beta: float = 0.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @classmethod
    def from_kwargs(cls, *, loss="ppo", clip_low=0.2, clip_high=None, dual_clip=None,
                    delta=None, ratio_level="token", agg=None, kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, log_ratio_clamp=20.0,
                    cispo_clip_low=False, **loss_options) -> "PolicyOptions":
        """Validate the user's keyword arguments (each error names the argument)."""
        _checks.choice("loss", loss, LOSSES)
        _checks.flag("cispo_clip_low", cispo_clip_low)
        if cispo_clip_low and loss != "cispo":
            raise ValueError(f"cispo_clip_low: expected False unless loss='cispo' (it clamps "
                             f"cispo's ratio below), got True with loss={loss!r}")
        clip_low = _checks.number("clip_low", clip_low, lo=0.0)
        if clip_low > 1.0 and (loss in ("ppo", "luspo", "clip_cov") or cispo_clip_low):
            raise ValueError(f"clip_low: expected a number in [0, 1] (the lower bound is "
                             f"1 - clip_low), got {clip_low}")
        clip_high = clip_low if clip_high is None else _checks.number("clip_high", clip_high,
                                                                      lo=0.0)
        if dual_clip is not None:
            dual_clip = _checks.number("dual_clip", dual_clip, lo=1.0, lo_open=True)
            if loss not in ("ppo", "luspo", "cispo", "reinforce", "dppo_tv", "dppo_kl"):
                raise ValueError(f"dual_clip: expected None with loss={loss!r} (it bounds "
                                 f"ppo / luspo and truncates dppo's ratio), got {dual_clip}")
        if delta is not None:
            delta = _checks.number("delta", delta)
            if delta <= 1.0 + clip_high:
                raise ValueError(f"delta: expected a number > 1 + clip_high = "
                                 f"{1.0 + clip_high}, got {delta}")
            if loss not in ("ppo", "luspo", "cispo", "reinforce"):
                raise ValueError(f"delta: expected None with loss={loss!r} (it caps the "
                                 f"unclipped ratio of ppo / luspo), got {delta}")
        if loss in ("dppo_tv", "dppo_kl") and dual_clip is None:
            dual_clip = DPPO_TRUNCATION
        _checks.choice("ratio_level", ratio_level, RATIO_LEVELS)
        if ratio_level != "token" and loss not in SEQUENCE_RATIO_LOSSES:
            raise ValueError(f"ratio_level: expected 'token' with loss={loss!r} (it defines "
                             f"its own ratio), got {ratio_level!r}")
        if agg is None:
            agg = DEFAULT_AGGS.get(loss, "token-mean")
        _checks.choice("agg", agg, AGGS)
        kl_coef = _checks.number("kl_coef", kl_coef)
        _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        entropy_coef = _checks.number("entropy_coef", entropy_coef)
        log_ratio_clamp = _checks.positive("log_ratio_clamp", log_ratio_clamp)
        extra = _loss_options(loss, loss_options)
        return cls(loss, clip_low, clip_high, dual_clip, delta, ratio_level, agg, kl_coef,
                   kl_estimator, entropy_coef, log_ratio_clamp, cispo_clip_low, **extra)

    @property
    def ratio_floor(self) -> float:
        """The lower clamp of the ratio in the policy term: ``1 - clip_low`` for ppo and for
        cispo with ``cispo_clip_low``, 0 for cispo without it (``r >= 0`` anyway)."""
        if self.loss in ("ppo", "luspo", "clip_cov") or self.cispo_clip_low:
            return 1.0 - self.clip_low
        return 0.0

    @property
    def kernel_bounds(self) -> Tuple[float, float]:
        """``(lo, hi)``, the two bounds the kernels read: the ratio's clip range
        ``(ratio_floor, 1 + clip_high)``, except for gmpo (log-ratio bounds ``-lo, hi``) and
        dppo (divergence thresholds), which read ``(clip_low, clip_high)`` as they are."""
        if self.loss in ("gmpo", "dppo_tv", "dppo_kl"):
            return self.clip_low, self.clip_high
        return self.ratio_floor, 1.0 + self.clip_high

    @property
    def loss_scalars(self) -> Tuple[float, float, float, float, float]:
        """The loss-specific floats as the kernels read them, ``(pos_a, neg_a, pos_b, neg_b,
        coef)``: sapo ``(tau_pos, tau_neg, 0, 0, 0)``; vespo ``(k_pos, k_neg, lambda_pos,
        lambda_neg, 0)`` (lambdas clamped at 1e-4 as TRL); kl_cov ``coef = kl_cov_coef``;
        dro ``coef = dro_beta``; dppo ``coef`` = the truncation ``dual_clip``."""
        if self.loss == "sapo":
            return self.tau_pos, self.tau_neg, 0.0, 0.0, 0.0
        if self.loss == "vespo":
            return (self.vespo_k_pos, self.vespo_k_neg, max(self.vespo_lambda_pos, 1e-4),
                    max(self.vespo_lambda_neg, 1e-4), 0.0)
        coef = {"kl_cov": self.kl_cov_coef, "dro": self.dro_beta,
                "dppo_tv": self.dual_clip, "dppo_kl": self.dual_clip}.get(self.loss)
        return 0.0, 0.0, 0.0, 0.0, float(coef or 0.0)

    def encode(self) -> Tuple[str, List[float]]:
        """``(modes, nums)``, the custom ops' form; computed once per options object (the
        fused losses encode on every call): the ``nums`` list is shared, never mutate it."""
        cached = self.__dict__.get("_encoded")
        if cached is None:
            cached = self._encode()
            object.__setattr__(self, "_encoded", cached)  # a cache, not a field
        return cached

    def _encode(self) -> Tuple[str, List[float]]:
        modes = "|".join((self.loss, self.ratio_level, self.agg, self.kl_estimator,
                          "cispo_clip_low" if self.cispo_clip_low else ""))
        nums = [self.clip_low, self.clip_high,
                0.0 if self.dual_clip is None else self.dual_clip,
                0.0 if self.delta is None else self.delta,
                self.kl_coef, self.entropy_coef, self.log_ratio_clamp]
        nums += [getattr(self, name) for name, _, _ in LOSS_OPTIONS]
        return modes, nums

    @classmethod
    def decode(cls, modes: str, nums: List[float]) -> "PolicyOptions":
        last = _LAST_DECODED
        if modes == last[0] and nums == last[1]:  # the same options as the last call
            return last[2]
        key = (modes, *nums)
        opts = _DECODED.get(key)
        if opts is None:
            loss, ratio_level, agg, kl_estimator, cispo_clip_low = modes.split("|")
            clip_low, clip_high, dual_clip, delta, kl_coef, entropy_coef, clamp = nums[:7]
            extra = {name: value for (name, _, _), value in zip(LOSS_OPTIONS, nums[7:])}
            opts = cls(loss, clip_low, clip_high, dual_clip or None, delta or None,
                       ratio_level, agg, kl_coef, kl_estimator, entropy_coef, clamp,
                       bool(cispo_clip_low), **extra)
            _remember(_DECODED, key, opts)
        _LAST_DECODED[:] = (modes, list(nums), opts)
        return opts


def _loss_options(loss: str, given: dict) -> Dict[str, float]:
    """Validate the loss-specific options (``None`` = the default of the loss's peer); an
    option of another loss is an error, not silently ignored."""
    known = {name: (owner, default) for name, owner, default in LOSS_OPTIONS}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"policy options: unexpected keyword argument(s) "
                        f"{', '.join(unknown)}; expected among {', '.join(known)}")
    out = {}
    for name, (owner, default) in known.items():
        value = given.get(name)
        if value is not None and loss != owner:
            raise ValueError(f"{name}: expected None unless loss={owner!r} (it is an option "
                             f"of {owner}), got {value!r} with loss={loss!r}")
        if loss != owner:
            continue
        if value is None and default is None:  # dro_beta: verl has no default either
            raise ValueError(f"{name}: expected a number > 0 with loss={owner!r} (the "
                             f"weight of its quadratic penalty), got None")
        value = default if value is None else value
        if name.startswith(("tau_", "vespo_lambda", "dro_", "clip_cov_ratio",
                            "kl_cov_ratio")):
            value = _checks.positive(name, value)
        else:  # kl_cov_coef, vespo_k_*, clip_cov_lb / ub: any finite number
            value = _checks.number(name, value)
        if name.endswith("_ratio") and value > 1.0:
            raise ValueError(f"{name}: expected a fraction of the tokens in (0, 1], "
                             f"got {value}")
        out[name] = value
    if loss == "clip_cov" and not out["clip_cov_lb"] < out["clip_cov_ub"]:
        raise ValueError(f"clip_cov_ub: expected a number > clip_cov_lb = "
                         f"{out['clip_cov_lb']}, got {out['clip_cov_ub']}")
    return out


# Memos of validated and decoded options. A training loop calls the ops with a few settings
# (a coefficient schedule adds one per step: hence the bound), and validation, encoding and
# decoding cost microseconds per call that the op would otherwise spend on every call.
_MEMO_LIMIT = 1024
_DECODED: Dict[tuple, PolicyOptions] = {}
# the last decode call's (modes, nums copy, options): a training loop passes the same options
# every step (a list compare instead of a 20-item key hashed)
_LAST_DECODED: list = [None, None, None]
_ENCODED: Dict[tuple, Tuple[PolicyOptions, str, List[float]]] = {}


def _remember(memo: dict, key, value) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[key] = value


def encoded_options(**kwargs) -> Tuple[PolicyOptions, str, List[float]]:
    """``(options, modes, nums)``: :meth:`PolicyOptions.from_kwargs` and its
    :meth:`~PolicyOptions.encode`, memoized on the type and value of every argument (so
    ``True`` and ``1`` stay apart; an unhashable argument is validated afresh, and rejected
    there). The returned ``nums`` list is shared between calls: never mutate it."""
    try:
        # the items, then their values' types: one tuple built in C (no generator)
        key = (*kwargs.items(), *map(type, kwargs.values()))
        hit = _ENCODED.get(key)
    except TypeError:
        key = hit = None
    if hit is None:
        opts = PolicyOptions.from_kwargs(**kwargs)
        hit = (opts, *opts.encode())
        if key is not None:
            _remember(_ENCODED, key, hit)
    return hit
