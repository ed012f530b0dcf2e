"""Policy-loss ops: ``kl_penalty``, ``policy_loss`` (log-probs in) and ``grpo_loss`` (the same
fused with the log-prob computation from logits), declared in the op table
(:mod:`rlkernels.ops._table`)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import _checks
from .. import distributed as _dist
from .._fused import forward_grad, fused_forward, fused_forward_gif
from .._policy_options import METRICS, PENALTY_ESTIMATORS, PolicyOptions
from ._common import check_tokens_for, out_dtype, rows, valid_logits_tokens
from ._policy_args import (check_policy_inputs, fused_policy_inputs, metrics_dict,
                           policy_options, rollout_inputs)
from ._table import Backward, GradInForward, Op, Parallel

Tensor = torch.Tensor
_FAMILY = "policy"

# the options travel through the custom ops as (modes, nums) and reach the kernels decoded
_OPTIONS = {"options": (("modes", "nums"), PolicyOptions.decode)}


def loss_outputs(x: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Empty ``(loss [], metrics [len(METRICS)] fp32)`` of the fakes."""
    return x.new_empty((), dtype=out_dtype(dtype)), x.new_empty(len(METRICS),
                                                                dtype=torch.float32)


# ================================================================================ kl_penalty

# elementwise on [B, T]: the reference is the kernel on every device (a fused kernel would
# save nothing over the few elementwise launches)
KL_PENALTY = Op(
    "kl_penalty(Tensor logp, Tensor ref_logp, str estimator, float? clamp_lo, float? "
    "clamp_hi, str backend='torch') -> (value)",
    _FAMILY, backends=("torch",),
    fake=lambda a: a.logp.new_empty(
        a.logp.shape, dtype=out_dtype(torch.promote_types(a.logp.dtype, a.ref_logp.dtype))),
    differentiable=("logp", "ref_logp"), saved=("logp", "ref_logp"),
    backward=Backward(("grad_value", "logp", "ref_logp", "estimator", "clamp_lo", "clamp_hi"),
                      grads=("logp", "ref_logp")),
    eager=True)


def kl_penalty(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3",
               clamp: Optional[Tuple[float, float]] = None) -> Tensor:
    """Elementwise KL penalty estimators on the log-probs of sampled tokens.

    With ``d = logp - ref_logp``: ``"k1"`` ``d``; ``"abs"`` ``|d|``; ``"k2"`` ``d^2 / 2``;
    ``"k3"`` (alias ``"low_var_kl"``) ``exp(-d) + d - 1``; ``"k3+"`` the value of k3 with the
    gradient of k2 (straight-through, an unbiased gradient of the KL). ``clamp=(lo, hi)``
    clamps the result (verl uses ``(-10, 10)`` for k3); like ``torch.clamp``, clamped
    elements get no gradient.

    Shapes: two float tensors of the same shape -> the same shape, fp32 (fp64 for fp64).
    Differentiable w.r.t. both inputs.
    """
    _checks.tensor("logp", logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("ref_logp", ref_logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("ref_logp", ref_logp, logp.shape, "the shape of logp")
    _checks.same_device("logp", logp, ref_logp=ref_logp)
    _checks.choice("estimator", estimator, PENALTY_ESTIMATORS)
    lo = hi = None
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp: expected None or a pair (lo, hi), got {clamp!r}")
        lo = _checks.number("clamp[0]", clamp[0])
        hi = _checks.number("clamp[1]", clamp[1])
        if lo > hi:
            raise ValueError(f"clamp: expected lo <= hi, got ({lo}, {hi})")
    return KL_PENALTY(logp, ref_logp, estimator, lo, hi, "torch")


# =============================================================================== policy_loss

_POLICY_TENSORS = ("logp", "old_logp", "advantages", "mask", "normalizer", "ref_logp",
                   "entropy", "is_weights")

POLICY_LOSS = Op(
    "policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? "
    "normalizer, Tensor? ref_logp, Tensor? entropy, Tensor? is_weights, str modes, "
    "float[] nums, str backend) -> (loss, metrics)",
    _FAMILY,
    fake=lambda a: loss_outputs(a.logp, a.logp.dtype),
    derive=_OPTIONS, kernel_args=_POLICY_TENSORS + ("options",),
    differentiable=("logp", "entropy"), nondiff=("metrics",), saved=_POLICY_TENSORS,
    backward=Backward(("grad_loss",) + _POLICY_TENSORS + ("options",),
                      grads=("logp", "entropy")),
    eager=True)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                loss: str = "ppo", clip_low: float = 0.2, clip_high: Optional[float] = None,
                dual_clip: Optional[float] = None, delta: Optional[float] = None,
                ratio_level: str = "token", agg: Optional[str] = None, normalizer=None,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: Optional[Tensor] = None,
                entropy_coef: float = 0.0, is_weights: Optional[Tensor] = None,
                log_ratio_clamp: float = 20.0, cispo_clip_low: bool = False,
                tau_pos: Optional[float] = None, tau_neg: Optional[float] = None,
                clip_cov_ratio: Optional[float] = None, clip_cov_lb: Optional[float] = None,
                clip_cov_ub: Optional[float] = None, kl_cov_ratio: Optional[float] = None,
                kl_cov_coef: Optional[float] = None, dro_beta: Optional[float] = None,
                vespo_k_pos: Optional[float] = None, vespo_lambda_pos: Optional[float] = None,
                vespo_k_neg: Optional[float] = None, vespo_lambda_neg: Optional[float] = None,
                rollout_logp: Optional[Tensor] = None, rollout_options=None,
                backend: Optional[str] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Policy-gradient losses (PPO / GSPO / CISPO / REINFORCE / SAPO / GMPO / Clip-Cov /
    KL-Cov / DPPO / DRO / VESPO / LUSPO) with KL and entropy terms.

    ``log r = clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)``;
    ``ratio_level="sequence"`` (GSPO) uses ``sg(s) + logp - sg(logp)`` per token, ``s`` the
    masked mean of ``log r`` over the sequence (ppo, cispo, reinforce, sapo, luspo only: the
    other losses define their own ratio and reject it). Per-token policy term (``A`` =
    advantages, broadcast over T when ``[B]``); docs/math.md "Policy losses" gives each
    formula with its source:

    * ``"ppo"``: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``; ``clip_high=None``
      means ``clip_low``; ``delta`` caps the unclipped ``r`` from above (two-sided clip,
      ``delta > 1 + clip_high``); ``dual_clip=c > 1`` bounds the loss by ``-c A`` where
      ``A < 0``.
    * ``"luspo"``: ppo's term (TRL's LUSPO, meant with ``ratio_level="sequence"``), whose
      default aggregation is ``"seq-mean-token-sum"`` (each sequence's token sum).
    * ``"cispo"``: ``-sg(clip(r, 0, 1 + clip_high)) A logp`` (MiniMax-M1 / TRL: no lower
      bound, ``clip_low`` unused); with ``cispo_clip_low=True``
      ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp`` (verl's ``cispo``).
    * ``"reinforce"``: ``-A logp`` (ratios only through ``is_weights``).
    * ``"sapo"`` (verl / TRL): ``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau = tau_pos``
      (default 1.0) where ``A > 0``, else ``tau_neg`` (default 1.05); default aggregation
      ``"seq-mean-token-mean"`` (what verl forces and TRL uses).
    * ``"gmpo"`` (verl's ``geo_mean``): per sequence ``-mean_m(A) exp(mean_m(c)) W``, ``c =
      min(log r, clip_high)`` where ``A > 0``, ``max(log r, -clip_low)`` where ``A < 0`` (the
      clip range is in log space), 0 where ``A = 0``; ``W`` the masked geometric mean of
      ``is_weights + 1e-10`` (1 without); every token of the sequence carries that value, so
      the default aggregation ``"seq-mean-token-mean"`` with ``normalizer=B`` is verl's mean
      over sequences. Gradients are exact.
    * ``"clip_cov"`` (verl): ppo's term (no ``delta`` / ``dual_clip``), set to 0 on the
      ``max(floor(clip_cov_ratio * sum m), 1)`` tokens of largest ``cov = (A - mean A)
      (logp - mean logp)`` (batch masked means) among those with ``clip_cov_lb < cov <
      clip_cov_ub`` not clipped by the ppo clip (defaults 2e-4, 1.0, 5.0). verl draws them
      at random among the candidates; here the choice is deterministic (largest ``cov``,
      ties to the lower index), on the device, without a host synchronisation.
    * ``"kl_cov"`` (verl): ``-A r`` (no clip), ``+ kl_cov_coef |log r|`` (default 0.1,
      verl's ``ppo_kl_coef``) on the ``max(floor(kl_cov_ratio * sum m), 1)`` tokens of
      largest ``cov`` (default ratio 2e-4).
    * ``"dppo_tv"`` / ``"dppo_kl"`` (verl, DPPO-Binary-TV / -KL): ``-A sg(min(r, C)) logp``
      on the tokens inside the trust region, 0 outside: where ``A > 0`` ``p - p_old <=
      clip_high`` (tv) / ``binary_kl(p_old, p) <= clip_high or p <= p_old`` (kl), else
      ``p - p_old >= -clip_low`` / ``binary_kl <= clip_low or p >= p_old``, ``p =
      exp(logp)``; ``clip_low`` / ``clip_high`` are the divergence thresholds; ``C =
      dual_clip`` (verl passes its ``clip_ratio_c``, 3.0 by default), 20 when ``None``.
    * ``"dro"`` (verl): ``-A logp + dro_beta / 2 (log r)^2`` (``dro_beta > 0`` required).
    * ``"vespo"`` (TRL): ``-sg(phi) A logp``, ``phi = exp(lam + k log w - lam w)``, ``log w
      = clamp(sum_m log r [+ sum_m clamp(log is_weights, log 1e-8, 20)], log 1e-8, 20)`` per
      sequence, ``(k, lam) = (vespo_k_pos, vespo_lambda_pos)`` (2, 3) where ``A >= 0``, else
      ``(vespo_k_neg, vespo_lambda_neg)`` (3, 2); non-finite ``phi`` counts 0.

    times ``is_weights`` (constant rollout-correction weights; gmpo and vespo fold them into
    their sequence weight as their peers do), ``+ kl_coef * kl_penalty(logp, ref_logp,
    estimator=kl_estimator)``, ``- entropy_coef * entropy``. ``kl_estimator`` also takes
    ``"k3_is"``: ``r * k3`` with the ratio ``r`` of the policy term (TRL's
    ``use_bias_correction_kl``, DeepSeek-V3.2: the ratio keeps its gradient, which makes the
    KL gradient the unbiased reverse-KL one), and ``"k3_is_sg"``: ``sg(r) * k3``. Options of
    a loss other than ``loss`` must stay ``None``.

    ``agg`` (``m`` = mask, ``L`` = per-token loss; ``None`` = ``"token-mean"`` except the
    defaults named above):
    ``"token-mean"`` ``sum(m L) / (normalizer or sum m)``; ``"seq-mean-token-mean"`` the
    sum over non-empty sequences of their token means ``/ (normalizer or their number)``;
    ``"seq-mean-token-sum"`` ``sum(m L) / (normalizer or number of non-empty sequences)``;
    ``"seq-mean-token-sum-norm"`` (Dr. GRPO) ``sum(m L) / (normalizer or T)``. Pass a global
    token or sequence count as ``normalizer`` (number or 0-dim tensor) to make the loss
    invariant to micro-batching and data parallelism. An empty denominator gives 0. TRL's
    and Liger's ``"grpo"`` loss divide the token means by ``B``, empty sequences included:
    ``agg="seq-mean-token-mean", normalizer=B`` reproduces it.

    Returns ``(loss, metrics)``: a 0-dim fp32 loss (fp64 for fp64 ``logp``) and a dict of
    0-dim fp32 tensors (no host sync), token-masked means: ``clipfrac`` (the clipped term is
    active: ``A > 0 and r > 1 + clip_high`` or ``A < 0 and r < 1 - clip_low``;
    for cispo: ``r > 1 + clip_high`` or, with ``cispo_clip_low``, ``r < 1 - clip_low``,
    whatever the sign of ``A``; gmpo: ``A > 0 and log r > clip_high`` or ``A < 0 and log r <
    -clip_low``; dppo: outside the trust region (``A > 0`` high, else low); clip_cov and
    kl_cov: also the covariance-selected tokens, so ``clipfrac - clipfrac_high -
    clipfrac_low`` is their share; 0 for reinforce, sapo, dro, vespo), ``clipfrac_high``,
    ``clipfrac_low``, ``dual_clipfrac`` (dppo: the truncation ``r > C`` is active inside the
    trust region), ``approx_kl`` (mean of ``-log r``), ``ratio_mean``, ``ratio_max`` (a
    masked max; both of the token ratio ``r``), and ``kl`` (mean penalty, with ``ref_logp``)
    and ``entropy`` (with ``entropy``). Every metric is a masked statistic: values at masked
    positions (NaN, inf) are selected away and never reach a metric, the loss or a gradient.
    Gradient flows to ``logp`` and ``entropy``; every other input is a constant.

    The entropy term is aggregated with ``agg`` like the rest of the loss (verl's actor does
    the same); TRL adds its bonus as a plain token mean whatever the loss type. The two agree
    for ``agg="token-mean"``; see docs/math.md for TRL's and Liger's forms.

    **Rollout correction** (SPEC 6; the trainer / inference-engine mismatch):
    ``rollout_logp`` (``[B, T]``, the inference engine's log-probs of the sampled tokens)
    turns on :func:`rlkernels.rollout_correction` between ``old_logp`` (the trainer's
    log-probs at rollout time) and ``rollout_logp``, with ``rollout_options`` (a dict of its
    keyword options: ``level`` token / sequence / geometric, ``mode`` truncate / mask,
    ``threshold_high`` / ``threshold_low``, ``reject`` / ``reject_threshold`` for sequence or
    token rejection, ``log_ratio_clamp``; its defaults when ``None``: token-level weights
    truncated at 2). Its weights multiply ``is_weights`` (constants), rejected tokens leave
    the mask (so the loss, its denominators and the metrics), and its metrics join the
    returned dict as ``"rollout/<name>"`` (k1 / k3 mismatch, weight mean / max / min, the
    fractions truncated, masked and rejected, ...). ``"opsm"`` rejection reads
    ``advantages``.

    Shapes: ``logp, old_logp, mask, ref_logp, entropy, is_weights, rollout_logp`` ``[B,
    T]``; ``advantages`` ``[B]`` or ``[B, T]``; ``mask`` bool or float (weights).
    """
    _checks.tensor("logp", logp, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    norm = check_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                is_weights, normalizer)
    mask, is_weights, rollout = rollout_inputs(rollout_logp, rollout_options, old_logp, mask,
                                               advantages, is_weights, backend)
    # in the order of POLICY_OPTION_NAMES
    _, modes, nums = policy_options(
        (loss, clip_low, clip_high, dual_clip, delta, ratio_level, agg, kl_coef, kl_estimator,
         log_ratio_clamp, cispo_clip_low, entropy_coef, tau_pos, tau_neg, clip_cov_ratio,
         clip_cov_lb, clip_cov_ub, kl_cov_ratio, kl_cov_coef, dro_beta, vespo_k_pos,
         vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg), ref_logp, entropy is not None)
    name = POLICY_LOSS.resolve(backend, logp)
    value, metrics = POLICY_LOSS(logp, old_logp, advantages, mask, norm, ref_logp, entropy,
                                 is_weights, modes, nums, name)
    metrics = metrics_dict(metrics, ref_logp is not None, entropy is not None)
    if rollout:
        metrics.update(rollout)
    return value, metrics


# ================================================================================= grpo_loss

_GRPO_INPUTS = ("logits", "tokens", "old_logp", "advantages", "mask", "normalizer",
                "ref_logp", "is_weights")


def _grpo_loss_parallel(a, kernel):
    # SPEC 3.5: the same composition with the log-probs and entropies of
    # rlkernels.distributed (collectives on the group); backward is the plain backward
    # kernel with the shard-local tokens and the global statistics: no communication
    vocab_forward = kernel("token_logprobs_forward", "vocab")
    local = {}

    def logprobs(flat_tokens):
        logp, ent, stats, local["tokens"] = _dist.token_logprobs_forward(
            vocab_forward, a.logits, flat_tokens, a.temperature, -100, True,
            _dist.group_of(a.group))
        return logp, ent, stats

    out = fused_forward(logprobs, kernel("policy_loss_forward"), a.tokens, a.old_logp,
                        a.advantages, a.mask, a.normalizer, a.ref_logp, a.is_weights,
                        PolicyOptions.decode(a.modes, a.nums))
    return (*out, local["tokens"].view(a.tokens.shape))


def _grpo_loss_gif(a, kernel, out):
    # grad_in_forward=True: the cuda backend's one-read kernel (sm_90a cluster, token-level
    # ratios, rows that fit a cluster; it returns None otherwise), else the composition of
    # the backend's kernels (rlkernels/_fused.py)
    o = PolicyOptions.decode(a.modes, a.nums)
    tensors = (a.logits, a.tokens, a.old_logp, a.advantages, a.mask, a.normalizer,
               a.ref_logp, a.is_weights)
    if a.backend == "cuda":
        result = kernel("grpo_loss_gif_forward", "grpo")(*tensors, a.temperature, o, out)
        if result is not None:
            return result
    return fused_forward_gif(kernel, *tensors, a.temperature, o, out)


def _grpo_loss_gif_parallel(a, kernel, out):
    # grad_in_forward=True with vocabulary parallelism: the parallel forward (the global
    # statistics through collectives), then this rank's shard of d logits from the
    # shard-local tokens and the global statistics, with no further communication
    loss, metrics, logp, ent, stats, local = _grpo_loss_parallel(a, kernel)
    grad = forward_grad(kernel, a.logits, local, loss, logp, ent, stats, a.old_logp,
                        a.advantages, a.mask, a.normalizer, a.ref_logp, a.is_weights,
                        a.temperature, PolicyOptions.decode(a.modes, a.nums), out)
    return loss, metrics, logp, ent, stats, local, grad


def grpo_outputs(x: Tensor, tokens: Tensor) -> Tuple[Tensor, ...]:
    """Empty outputs of the fused losses' fakes, for ``[N, V]`` logits or ``[N, H]`` hidden
    states ``x``: loss, metrics, and the per-token log-probs, entropies, row statistics."""
    dt = out_dtype(x.dtype)
    return (*loss_outputs(x, x.dtype), x.new_empty(tokens.shape, dtype=dt),
            x.new_empty(tokens.shape, dtype=dt), x.new_empty(x.shape[0], 3, dtype=dt))


GRPO_LOSS = Op(
    "grpo_loss(Tensor logits, Tensor tokens, Tensor old_logp, Tensor advantages, Tensor "
    "mask, Tensor? normalizer, Tensor? ref_logp, Tensor? is_weights, float temperature, "
    "str modes, float[] nums, str backend, bool inplace_backward) -> (loss, metrics, "
    "logp, entropy, stats)",
    _FAMILY,
    fake=lambda a: grpo_outputs(a.logits, a.tokens),
    derive=_OPTIONS, kernel_args=_GRPO_INPUTS + ("temperature", "options"),
    differentiable=("logits",), nondiff=("metrics", "logp", "entropy", "stats"),
    saved=_GRPO_INPUTS + ("logp", "entropy", "stats"),
    backward=Backward(("grad_loss",) + _GRPO_INPUTS
                      + ("logp", "entropy", "stats", "temperature", "options", "inplace"),
                      grads=("logits",)),
    # inplace_backward=True: backward writes d logits into the logits' storage
    inplace=("inplace_backward", "logits"),
    parallel=Parallel(
        _grpo_loss_parallel, backends=("torch", "triton", "cuda"),
        extra_outputs=("local_tokens",),
        extra_fake=lambda a: (a.logits.new_empty(a.tokens.shape, dtype=torch.int64),),
        save_as={"tokens": "local_tokens"}),
    # grad_in_forward=True: the forward also forms d loss / d logits (for 1); backward scales
    grad_in_forward=GradInForward(_grpo_loss_gif, family="grpo", loss="loss", wrt="logits",
                                  parallel=_grpo_loss_gif_parallel),
    # the eager Function returns (loss, metrics) only: grpo_loss reads nothing else
    eager=True, eager_outputs=2)


def grpo_loss(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
              mask: Tensor, *, temperature: float = 1.0, ref_logp: Optional[Tensor] = None,
              entropy_coef: float = 0.0, inplace_backward: bool = False,
              grad_in_forward: bool = False, backend: Optional[str] = None,
              process_group=None, **policy_loss_options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``policy_loss(token_logprobs(logits, tokens, temperature=T), ...)`` fused: one pass over
    the logits forward, one backward pass that writes ``d logits`` directly.

    ``logits [B, T, V]``, ``tokens [B, T]`` (``-100`` marks padding: log-prob 0, zero
    gradient), ``old_logp``, ``mask``, ``ref_logp`` ``[B, T]``, ``advantages`` ``[B]`` or
    ``[B, T]``. The entropy of every position is computed in the same pass: it is reported
    as ``metrics["entropy"]`` and enters the loss as ``- entropy_coef * H``.
    ``policy_loss_options`` are the keyword options of :func:`policy_loss` (``loss``,
    ``clip_low``, ``clip_high``, ``dual_clip``, ``delta``, ``ratio_level``, ``agg``,
    ``normalizer``, ``kl_coef``, ``kl_estimator``, ``is_weights``, ``log_ratio_clamp``,
    ``cispo_clip_low``).

    ``inplace_backward=True`` writes the gradient into the storage of ``logits`` instead of
    allocating a new ``[B, T, V]`` tensor: the logits are destroyed by ``backward()``, so
    they must not be used afterwards (nor be a leaf whose ``.grad`` you keep).

    ``grad_in_forward=True`` forms ``d loss / d logits`` in the forward, for an upstream
    gradient of 1, while the forward has every per-token quantity at hand (the softmax
    statistics, ``d loss / d logp`` and ``d loss / d H``, the aggregation's normalizer); the
    backward then only multiplies it by the upstream scalar (nothing when it is exactly 1)
    and reads no logits: the logits may be freed, or overwritten, after the forward. The
    gradient is exact for any upstream scalar (the loss is a scalar; one extra rounding to
    the logits' dtype where the scalar is not 1). Memory: the ``[B, T, V]`` gradient buffer
    (the logits' dtype) is allocated by the forward and lives until the backward hands it
    to autograd, instead of existing during the backward only; with
    ``inplace_backward=True`` the forward writes it into the logits' storage instead (no
    buffer; the logits are destroyed by the forward, not the backward). Only the loss is
    differentiable (as always: the metrics are constants); the backward consumes the buffer
    (scales it in place), so such a graph is backpropagated once (a second backward with
    ``retain_graph=True`` raises in eager mode). Where nothing needs the gradient (no grad
    mode, logits that do not require grad) the plain forward runs. On the cuda backend
    with sm_90a, token-level ratios and rows that fit a thread-block cluster, one kernel
    reads each logit once (two passes over the ``[B, T, V]`` data instead of three, see
    benchmarks/NOTES.md); elsewhere (every other backend, sequence-level ratios) the
    forward composes the usual kernels and saves the backward's read instead. The saving
    needs an upstream gradient of exactly 1 (``loss.backward()``): any other scalar
    (``(loss / accum_steps).backward()``, a GradScaler's scale) costs the backward one read
    and one write of the buffer, as many passes as the default path; fold such a constant
    into ``normalizer`` instead (the loss is ``sum / normalizer`` for every ``agg``, so
    ``normalizer=n * accum_steps`` gives ``loss / accum_steps``). ``auto`` does not turn it
    on: it is off unless asked for (no GPU measurement of it exists yet). With
    ``process_group`` the forward forms this rank's shard of the gradient (the three-pass
    composition; no communication besides the forward's). Formulas: docs/math.md,
    "grpo_loss: the gradient in the forward".

    ``process_group``: vocabulary parallelism (SPEC 3.5), as in :func:`token_logprobs`:
    ``logits`` is this rank's vocabulary shard, ``tokens`` are global ids, every other input
    is the same on every rank. The per-token log-probs and entropies are the unsharded ones
    (collectives in forward), so the loss and metrics are those of the unsharded op on every
    rank; backward writes this rank's shard of ``d logits`` locally, ``d logits = (d loss /
    d logp) (onehot(y) - p) - (d loss / d H) p (z - sum p z)`` (over ``T``) with the global
    softmax statistics, with no communication.

    Returns ``(loss, metrics)`` as :func:`policy_loss`.
    """
    if not (valid_logits_tokens(logits, tokens) and logits.dim() == 3):
        _checks.logits("logits", logits)
        if logits.dim() != 3:
            raise ValueError(f"logits: expected a 3-d tensor [B, T, V], got shape "
                             f"{tuple(logits.shape)}")
        check_tokens_for("tokens", tokens, "logits", logits)
    t = _checks.positive("temperature", temperature)
    # the flags' common case inline (a check call costs ~0.3 us per op call)
    if type(inplace_backward) is not bool:
        _checks.flag("inplace_backward", inplace_backward)
    if type(grad_in_forward) is not bool:
        _checks.flag("grad_in_forward", grad_in_forward)
    handle = None
    if process_group is not None:
        handle = _dist.register_group(process_group)
        if _checks.debug_enabled():
            _dist.check_global_tokens("tokens", tokens, logits.shape[-1], -100, process_group)
    else:
        _checks.token_range("tokens", tokens, logits.shape[-1], -100)
    _, modes, nums, norm, is_weights, mask, rollout = fused_policy_inputs(
        "grpo_loss", policy_loss_options, tokens, old_logp, advantages, mask, ref_logp,
        entropy_coef, backend)
    name = GRPO_LOSS.resolve(backend, logits, handle is not None)
    # the [N, V] rows are taken by the op (inside the eager Function: no view node)
    value, metrics = GRPO_LOSS(logits, tokens, old_logp, advantages, mask, norm, ref_logp,
                               is_weights, t, modes, nums, name, inplace_backward,
                               group=handle, grad_in_forward=grad_in_forward,
                               maps=_ROWS)[:2]
    metrics = metrics_dict(metrics, ref_logp is not None, True)
    if rollout:
        metrics.update(rollout)
    return value, metrics


_ROWS = ((0, rows),)
