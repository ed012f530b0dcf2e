"""The settings of a clipped policy loss, validated once and carried as one frozen value.

Custom ops only take primitive arguments, so :meth:`PolicyOptions.encode` turns the options
into a mode string and a list of floats (constants for ``torch.compile``), and
:meth:`PolicyOptions.decode` turns them back inside the op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import _checks

LOSSES = ("ppo", "cispo", "reinforce")
RATIO_LEVELS = ("token", "sequence")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+")

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

    @classmethod
    def from_kwargs(cls, *, loss="ppo", clip_low=0.2, clip_high=None, dual_clip=None,
                    delta=None, ratio_level="token", agg="token-mean", kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, log_ratio_clamp=20.0,
                    cispo_clip_low=False) -> "PolicyOptions":
        """Validate the user's keyword arguments (each error names the argument)."""
        _checks.choice("loss", loss, LOSSES)
        _checks.flag("cispo_clip_low", cispo_clip_low)
        if cispo_clip_low and loss != "cispo":
            raise ValueError(f"cispo_clip_low: expected False unless loss='cispo' (it clamps "
                             f"cispo's ratio below), got True with loss={loss!r}")
        clip_low = _checks.number("clip_low", clip_low, lo=0.0)
        if clip_low > 1.0 and (loss == "ppo" or cispo_clip_low):
            raise ValueError(f"clip_low: expected a number in [0, 1] (the lower bound is "
                             f"1 - clip_low), got {clip_low}")
        clip_high = clip_low if clip_high is None else _checks.number("clip_high", clip_high,
                                                                      lo=0.0)
        if dual_clip is not None:
            dual_clip = _checks.number("dual_clip", dual_clip, lo=1.0, lo_open=True)
        if delta is not None:
            delta = _checks.number("delta", delta)
            if delta <= 1.0 + clip_high:
                raise ValueError(f"delta: expected a number > 1 + clip_high = "
                                 f"{1.0 + clip_high}, got {delta}")
        _checks.choice("ratio_level", ratio_level, RATIO_LEVELS)
        _checks.choice("agg", agg, AGGS)
        kl_coef = _checks.number("kl_coef", kl_coef)
        _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        entropy_coef = _checks.number("entropy_coef", entropy_coef)
        log_ratio_clamp = _checks.positive("log_ratio_clamp", log_ratio_clamp)
        return cls(loss, clip_low, clip_high, dual_clip, delta, ratio_level, agg, kl_coef,
                   kl_estimator, entropy_coef, log_ratio_clamp, cispo_clip_low)

    @property
    def ratio_floor(self) -> float:
        """The lower clamp of the ratio in the policy term: ``1 - clip_low`` for ppo and for
        cispo with ``cispo_clip_low``, 0 for cispo without it (``r >= 0`` anyway)."""
        if self.loss == "ppo" or self.cispo_clip_low:
            return 1.0 - self.clip_low
        return 0.0

    def encode(self) -> Tuple[str, List[float]]:
        modes = "|".join((self.loss, self.ratio_level, self.agg, self.kl_estimator,
                          "cispo_clip_low" if self.cispo_clip_low else ""))
        nums = [self.clip_low, self.clip_high,
                0.0 if self.dual_clip is None else self.dual_clip,
                0.0 if self.delta is None else self.delta,
                self.kl_coef, self.entropy_coef, self.log_ratio_clamp]
        return modes, nums

    @classmethod
    def decode(cls, modes: str, nums: List[float]) -> "PolicyOptions":
        key = (modes, *nums)
        opts = _DECODED.get(key)
        if opts is None:
            loss, ratio_level, agg, kl_estimator, cispo_clip_low = modes.split("|")
            clip_low, clip_high, dual_clip, delta, kl_coef, entropy_coef, clamp = nums
            opts = cls(loss, clip_low, clip_high, dual_clip or None, delta or None,
                       ratio_level, agg, kl_coef, kl_estimator, entropy_coef, clamp,
                       bool(cispo_clip_low))
            _remember(_DECODED, key, opts)
        return opts


# Memos of validated and decoded options. A training loop calls the ops with a few settings
# (a coefficient schedule adds one per step: hence the bound), and validation, encoding and
# decoding cost microseconds per call that the op would otherwise spend on every call.
_MEMO_LIMIT = 1024
_DECODED: Dict[tuple, PolicyOptions] = {}
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
        key = tuple((name, type(value), value) for name, value in kwargs.items())
        hit = _ENCODED.get(key)
    except TypeError:
        key = hit = None
    if hit is None:
        opts = PolicyOptions.from_kwargs(**kwargs)
        hit = (opts, *opts.encode())
        if key is not None:
            _remember(_ENCODED, key, hit)
    return hit
