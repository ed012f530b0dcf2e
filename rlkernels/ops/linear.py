"""Fused lm_head ops: log-probs and the GRPO loss straight from hidden states, without ever
materializing the ``[N, V]`` logits; declared in the op table (:mod:`rlkernels.ops._table`).

Vocabulary parallelism (SPEC 3.5): ``weight`` / ``bias`` are this rank's vocabulary shard
and ``hidden`` is replicated. Forward: per-shard statistics combined by collectives
(:mod:`rlkernels.distributed`). Backward: the plain backward kernels with the shard-local
tokens and the global statistics give this rank's ``d weight`` / ``d bias`` shards and its
part of ``d hidden``; the one collective of backward sums ``d hidden`` over the ranks.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple, Union

import torch

from .. import _checks
from .. import distributed as _dist
from .._fused import fused_forward, fused_linear_gif, one_pass
from .._policy_options import PolicyOptions
from ..reference import as_flat, as_rows
from ._common import _FLOATS, _INDEX, check_tokens_for, out_dtype
from ._eager import PLAIN
from ._policy_args import fused_policy_inputs, metrics_dict
from ._table import Backward, GradInForward, Op, Parallel
from .policy import grpo_outputs
from .sparse import _support as _sparse_support
from .sparse import _views as _sparse_views


Tensor = torch.Tensor
_FAMILY = "linear"
_BACKENDS = ("torch", "triton", "cuda")
# the private TRL head (pre-softmax map, extra statistics): no cuda kernels
_STATS_BACKENDS = ("torch", "triton")
_OPTIONS = {"options": (("modes", "nums"), PolicyOptions.decode)}
_HEAD = ("hidden", "weight", "bias")


def _row_outputs(a, *widths):
    n, dt = a.hidden.shape[0], out_dtype(a.hidden.dtype)
    return tuple(a.hidden.new_empty((n, w) if w else (n,), dtype=dt) for w in widths)


def _local_forward(kernel, head_precision: Optional[str]):
    """The backend's fused forward with ``head_precision`` bound (the collective helpers of
    :mod:`rlkernels.distributed` call it with the plain arguments)."""
    fn = kernel("linear_token_logprobs_forward")
    return fn if head_precision is None else functools.partial(fn,
                                                               head_precision=head_precision)


def _reduce_hidden(a, grads):
    """This rank's ``d hidden`` is the sum over its vocabulary columns only: the all-shard
    ``d hidden`` is its sum over the ranks (skipped when ``hidden`` needs no gradient)."""
    if a.need_hidden:
        grads["hidden"] = _dist.all_reduce_sum(grads["hidden"].contiguous(),
                                               _dist.group_of(a.group))
    return grads


# ==================================================================== linear_token_logprobs

def _linear_token_logprobs_parallel(a, kernel):
    return _dist.linear_token_logprobs_forward(
        _local_forward(kernel, a.head_precision), a.hidden, a.weight, a.bias, a.tokens,
        a.temperature, a.ignore_index, a.with_entropy, _dist.group_of(a.group))


LINEAR_TOKEN_LOGPROBS = Op(
    "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, "
    "float temperature, int ignore_index, bool with_entropy, str backend, str? "
    "head_precision=None, str path='auto', Tensor? rows=None) -> (logp, entropy, stats)",
    _FAMILY, backends=_BACKENDS,
    fake=lambda a: _row_outputs(a, 0, 0, 3),
    differentiable=_HEAD, nondiff=("stats",), saved=_HEAD + ("tokens", "stats", "rows"),
    grad_if={"entropy": lambda a: a.with_entropy},
    backward=Backward(("grad_logp", "grad_entropy") + _HEAD
                      + ("tokens", "stats", "temperature", "ignore_index", "head_precision",
                         "path", "rows"), grads=_HEAD),
    parallel=Parallel(
        _linear_token_logprobs_parallel, backends=_BACKENDS, extra_outputs=("local_tokens",),
        extra_fake=lambda a: (a.hidden.new_empty(a.hidden.shape[0], dtype=torch.int64),),
        save_as={"tokens": "local_tokens"}, reduce=_reduce_hidden))


def _valid_linear(hidden, weight, bias, tokens=None) -> bool:
    """The common case of :func:`_check_linear` (and, with ``tokens``, of
    ``check_tokens_for``) in one pass. False sends the call through the checks one by one,
    which raise the error of the first bad argument (and accept tensor subclasses)."""
    if type(hidden) not in PLAIN or type(weight) not in PLAIN:
        return False
    hs, ws, dt, dev = hidden.shape, weight.shape, hidden.dtype, hidden.device
    if not (dt in _FLOATS and len(hs) >= 1 and len(ws) == 2 and ws[0] != 0
            and hs[-1] == ws[1] and weight.dtype == dt and weight.device == dev):
        return False
    if bias is not None and not (type(bias) in PLAIN and bias.dtype == dt
                                 and bias.device == dev and bias.shape == ws[:1]):
        return False
    # valid_logits_tokens(hidden, tokens) with the shape, dtype and device read above
    return tokens is None or (type(tokens) is Tensor and tokens.dtype in _INDEX
                              and tokens.shape == hs[:-1] and tokens.device == dev)


def _check_linear(hidden, weight, bias) -> None:
    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected a vocabulary size V >= 1 rows ([V, H]), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: expected a last dimension of {weight.shape[1]} (H of weight "
                         f"[V, H]), got shape {tuple(hidden.shape)}")
    _checks.same_dtype("hidden", hidden, weight=weight, bias=bias)
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],), "[V], one per row of weight")


HEAD_PRECISIONS = ("bf16", "tf32", "fp32")
_PATHS = ("auto", "triton", "cublas")


def _check_head_options(head_precision, path: str) -> None:
    if head_precision is not None and head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision: expected None or one of "
                         f"{', '.join(map(repr, HEAD_PRECISIONS))}, got {head_precision!r}")
    if path not in _PATHS:
        raise ValueError(f"path: expected one of {', '.join(map(repr, _PATHS))}, got "
                         f"{path!r}")


def _check_rows(rows, hidden: Tensor, process_group) -> None:
    """``rows``: ``None`` or distinct int64 row indices in ``[0, N)`` on hidden's device (the
    range and distinctness are checked in debug mode only: they need a host sync)."""
    if rows is None:
        return
    _checks.tensor("rows", rows, dtypes=(torch.int64,), ndim=1)
    _checks.same_device("hidden", hidden, rows=rows)
    if process_group is not None:
        raise ValueError("rows: expected None with a process_group (the vocabulary-parallel "
                         "ops compute every row), got a tensor")
    if _checks.debug_enabled() and rows.numel():
        n = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"rows: expected indices in [0, {n}) (rows of hidden), got "
                             f"[{lo}, {hi}]")
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows: expected distinct indices, got repeated ones")


def _check_group_tokens(process_group, tokens: Tensor, weight: Tensor,
                        ignore_index: int) -> Optional[int]:
    """The group's handle (None without a group), and the token-range check: against the
    global vocabulary under a group (debug mode only: it needs a collective and a host
    sync), else against ``weight``."""
    if process_group is None:
        _checks.token_range("tokens", tokens, weight.shape[0], ignore_index)
        return None
    handle = _dist.register_group(process_group)
    if _checks.debug_enabled():
        _dist.check_global_tokens("tokens", tokens, weight.shape[0], ignore_index,
                                  process_group)
    return handle


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                          bias: Optional[Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          head_precision: Optional[str] = None,
                          rows: Optional[Tensor] = None,
                          backend: Optional[str] = None, process_group=None
                          ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``token_logprobs(hidden @ weight^T + bias, tokens)`` without materializing the logits.

    ``hidden [..., H]``, ``weight [V, H]`` (the lm_head), ``bias [V]`` or ``None``, all of one
    float dtype; ``tokens [...]`` ids in ``[0, V)`` or ``ignore_index``. Same semantics,
    outputs and options as :func:`token_logprobs` (temperature, padding, entropy on request).
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (gradients in their dtype,
    accumulated in fp32).

    ``head_precision`` (SPEC 6): the precision of the GEMMs' operands (``hidden``,
    ``weight``, and in backward ``d logits``); accumulation is fp32 always (fp64 for fp64
    inputs). ``None`` (default): the inputs as they are (bf16 inputs: bf16 GEMMs, ``d
    logits`` rounded to bf16 for the backward GEMMs on GPUs; fp32 inputs: full fp32).
    ``"bf16"``: every operand rounded to bf16 first. ``"tf32"``: fp32 operands on TF32
    tensor cores on a GPU (10-bit mantissa); on CPU, and in the ``torch`` reference, it is
    computed as ``"fp32"``. ``"fp32"``: fp32 operands (exact for bf16 / fp16 inputs) and ``d
    logits`` kept in fp32 (the fp32 lm_head of ScaleRL / TRL #4303). Padding rows
    (``ignore_index``) cost no GEMM work in the triton kernels' all-padding row blocks.

    ``rows`` (int64 ``[R]``, distinct indices into the flattened rows of ``hidden``, e.g.
    the response positions: verl #7686): only those rows go through the GEMMs, on every
    backend and path; the other rows are treated as padding (log-prob and entropy 0, no
    gradient). Gathered and scattered on device, no host sync (``set_debug(True)`` checks
    range and distinctness). Not with ``process_group``.

    ``process_group``: vocabulary (tensor) parallelism (SPEC 3.5). ``weight [V_local, H]``
    and ``bias [V_local]`` are this rank's contiguous shard of the lm_head rows (ranks in
    group order, sizes may differ), ``hidden`` is the same on every rank and ``tokens`` are
    global ids. Every rank gets the outputs of the unsharded op (forward: three collectives,
    see :mod:`rlkernels.distributed`). Backward: with ``d z`` the gradient w.r.t. this
    shard's logits (computed locally from the saved global statistics), ``d weight = d z^T
    hidden`` and ``d bias = sum_rows d z`` are this rank's shards, computed without
    communication; ``d hidden = sum_ranks d z_r W_r`` spans every shard, so backward runs
    ONE ``all_reduce`` (sum) of ``d hidden`` on the group, and every rank receives the
    unsharded ``d hidden`` (the only communication in backward; none when ``hidden`` needs
    no gradient). This is the gradient of the unsharded op: do not also sum it over the
    group yourself (e.g. by feeding ``hidden`` through Megatron's
    ``copy_to_tensor_model_parallel_region``, whose backward is that same all-reduce).
    Every rank must call the op with the same rows, tokens and arguments.
    """
    if not _valid_linear(hidden, weight, bias, tokens):
        _check_linear(hidden, weight, bias)
        check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    return _linear_token_logprobs(hidden, weight, tokens, bias, t, ignore_index,
                                  return_entropy, head_precision, backend, process_group,
                                  "auto", rows)


def _linear_token_logprobs(hidden, weight, tokens, bias, t, ignore_index, return_entropy,
                           head_precision, backend, process_group, path, rows=None):
    """:func:`linear_token_logprobs` after its own checks, with the fused backends' ``path``
    (``"auto"``, ``"triton"`` or ``"cublas"``; the benchmarks compare them)."""
    _check_head_options(head_precision, path)
    _check_rows(rows, hidden, process_group)
    handle = _check_group_tokens(process_group, tokens, weight, ignore_index)
    name = LINEAR_TOKEN_LOGPROBS.resolve(backend, hidden, handle is not None)
    shape = tokens.shape
    # the [N, H] rows of hidden, the [N] tokens and the outputs' [...] shape are taken by
    # the op (inside the eager Function: no view node in the autograd graph; none at all for
    # a backend whose kernels take the public shapes)
    views = ((0, shape), (1, shape)) if return_entropy else ((0, shape),)
    logp, ent = LINEAR_TOKEN_LOGPROBS(hidden, weight, bias, tokens, t, ignore_index,
                                      return_entropy, name, head_precision, path, rows,
                                      group=handle, maps=_HIDDEN_TOKEN_ROWS, views=views)[:2]
    return (logp, ent) if return_entropy else logp


# =================================================================== linear_sparse_logprobs

LINEAR_SPARSE_LOGPROBS = Op(
    "linear_sparse_logprobs(Tensor hidden, Tensor weight, Tensor? bias, Tensor indices, "
    "float temperature, str normalize, bool with_tail, str backend, Tensor? offsets=None) "
    "-> (logp, tail, stats)",
    _FAMILY, backends=_BACKENDS,
    fake=lambda a: (a.hidden.new_empty(a.indices.shape, dtype=out_dtype(a.hidden.dtype)),
                    *_row_outputs(a, 0, 3)),
    differentiable=_HEAD, nondiff=("stats",),
    saved=_HEAD + ("indices", "logp", "tail", "stats", "offsets"),
    grad_if={"tail": lambda a: a.with_tail},
    backward=Backward(("grad_logp", "grad_tail") + _HEAD
                      + ("indices", "logp", "tail", "stats", "temperature", "normalize",
                         "offsets"), grads=_HEAD))


def linear_sparse_logprobs(hidden: Tensor, weight: Tensor, indices: Tensor, *,
                           offsets: Optional[Tensor] = None,
                           bias: Optional[Tensor] = None, temperature: float = 1.0,
                           normalize: str = "full", return_tail: bool = False,
                           backend: Optional[str] = None
                           ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`sparse_logprobs` of the logits ``hidden @ weight^T + bias`` without
    materializing them: log-probabilities at ``K`` given vocabulary ids per row (a sampler's
    top-k / top-p support, a teacher's top-k).

    With ``z = (hidden @ weight^T + bias) / temperature``: ``normalize="full"`` gives
    ``log softmax(z)`` over all ``V`` columns at ``indices``; ``normalize="support"`` gives
    ``z_k - logsumexp_k z_k`` over the row's valid ids (the log-probs of a top-k / top-p
    sampler, renormalized over its support; see :func:`sampling_support`). An index of ``-1``
    is an unused slot (``-inf``, no part in the support). ``return_tail=True`` also returns
    ``log(1 - sum of the full-vocabulary probabilities of the row's distinct valid ids)``.

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]`` or ``None`` (one float dtype),
    ``indices [..., K]`` int32/int64 -> ``[..., K]`` (and ``[...]``), fp32 (fp64 for fp64).
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (gradients in their dtype,
    accumulated in fp32).

    CSR support (as :func:`sparse_logprobs`): ``offsets [N + 1]`` (``N`` the rows of
    ``hidden``, every leading dim flattened) and ``indices [nnz]`` -> log-probs ``[nnz]``,
    tail ``[...]``.
    """
    if not _valid_linear(hidden, weight, bias):
        _check_linear(hidden, weight, bias)
    ids = _sparse_support("hidden", hidden, indices, offsets, weight.shape[0])
    t = _checks.positive("temperature", temperature)
    _checks.choice("normalize", normalize, ("full", "support"))
    _checks.flag("return_tail", return_tail)
    name = LINEAR_SPARSE_LOGPROBS.resolve(backend, hidden)
    # the [N, H] rows of hidden and the outputs' shapes are taken by the op (no view node;
    # logp and tail, saved for backward, stay autograd views)
    logp, tail, _ = LINEAR_SPARSE_LOGPROBS(hidden, weight, bias, ids, t, normalize,
                                           return_tail, name, offsets, maps=_HIDDEN_ROWS,
                                           views=_sparse_views(hidden, indices.shape,
                                                               return_tail))
    return (logp, tail) if return_tail else logp


# ==================================================== _linear_token_stats (private: the TRL head)

LINEAR_TOKEN_STATS = Op(
    "linear_token_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, float "
    "temperature, int ignore_index, bool with_entropy, float logit_scale, float? softcap, "
    "bool extras, str backend) -> (logp, entropy, stats, extra)",
    _FAMILY, backends=_STATS_BACKENDS,
    fake=lambda a: _row_outputs(a, 0, 0, 3, 3),
    differentiable=_HEAD, nondiff=("stats", "extra"), saved=_HEAD + ("tokens", "stats"),
    grad_if={"entropy": lambda a: a.with_entropy},
    backward=Backward(("grad_logp", "grad_entropy") + _HEAD
                      + ("tokens", "stats", "temperature", "ignore_index", "logit_scale",
                         "softcap"), grads=_HEAD))


def _linear_token_stats(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                        bias: Optional[Tensor] = None, temperature: float = 1.0,
                        ignore_index: int = -100, return_entropy: bool = False,
                        logit_scale: float = 1.0, softcap: Optional[float] = None,
                        extras: bool = False, backend: Optional[str] = None
                        ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                   Optional[Tensor]]:
    """:func:`linear_token_logprobs` for lm_heads with a pre-softmax map, plus the per-row
    statistics TRL's fused lm_head reports (``trl.kernels.ChunkedLogProbFunction``).

    Logits: ``y = hidden @ weight^T + bias``, ``u = logit_scale * y``, ``z = c tanh(u / c)``
    with a soft cap ``c = softcap`` (``z = u`` without), then ``z / T`` (TRL's order: scale,
    cap, temperature). Returns ``(logp, entropy, log_sum_sq_probs, mean_logits, is_top1)``,
    each ``[...]`` (fp32; fp64 for fp64 inputs; ``is_top1`` bool), ``None`` where not asked
    for (``entropy`` without ``return_entropy``, the last three without ``extras``), with
    ``p = softmax(z / T)``:

    * ``log_sum_sq_probs = log sum_j p_j^2``;
    * ``mean_logits = (1/V) sum_j z_j / T`` (over all ``V`` columns; ``-inf`` with a ``-inf``
      column);
    * ``is_top1``: the token is the arg-max of ``z``, ties going to the FIRST maximal column
      (``torch.argmax``), so a tie with an earlier column is not a top-1 hit.

    Padding rows (``tokens == ignore_index``) give 0 / False everywhere. ``logp`` and
    ``entropy`` are differentiable w.r.t. ``hidden``, ``weight``, ``bias`` (the chain rule
    through the map: ``dz/dy = logit_scale (1 - tanh(u / c)^2)``); the three extra statistics
    are not (TRL does not differentiate them either)."""
    if not _valid_linear(hidden, weight, bias, tokens):
        _check_linear(hidden, weight, bias)
        check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    _checks.flag("extras", extras)
    scale = _checks.number("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _checks.number("softcap", softcap)
        if softcap == 0.0:
            raise ValueError("softcap: expected None or a nonzero float (the cap c of "
                             "c * tanh(u / c)), got 0.0")
    _checks.token_range("tokens", tokens, weight.shape[0], ignore_index)
    name = LINEAR_TOKEN_STATS.resolve(backend, hidden)
    logp, ent, _, extra = LINEAR_TOKEN_STATS(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1), t,
        ignore_index, return_entropy, scale, softcap, extras, name)
    shape = tokens.shape
    if not extras:
        return logp.view(shape), ent.view(shape) if return_entropy else None, None, None, None
    return (logp.view(shape), ent.view(shape) if return_entropy else None,
            extra[:, 0].view(shape), extra[:, 1].view(shape), (extra[:, 2] != 0).view(shape))


# ========================================================================= linear_grpo_loss

_GRPO_INPUTS = _HEAD + ("tokens", "old_logp", "advantages", "mask", "normalizer", "ref_logp",
                        "is_weights")


def _linear_grpo_loss_parallel(a, kernel):
    # the same composition with the log-probs of linear_token_logprobs' parallel forward
    local_forward = _local_forward(kernel, a.head_precision)
    local = {}

    def logprobs(flat_tokens):
        logp, ent, stats, local["tokens"] = _dist.linear_token_logprobs_forward(
            local_forward, a.hidden, a.weight, a.bias, flat_tokens, a.temperature, -100, True,
            _dist.group_of(a.group))
        return logp, ent, stats

    out = fused_forward(logprobs, kernel("policy_loss_forward", "policy"), a.tokens,
                        a.old_logp, a.advantages, a.mask, a.normalizer, a.ref_logp,
                        a.is_weights, PolicyOptions.decode(a.modes, a.nums))
    return (*out, local["tokens"].view(a.tokens.shape))


def _linear_grpo_loss_gif(a, kernel, out):
    # grad_in_forward=True: the triton backend's chunk loop (three GEMMs, cuBLAS through
    # torch.mm) where the per-token gradient is known per chunk (token-level ratios), else
    # the composition of the backend's forward and backward (rlkernels/_fused.py)
    o = PolicyOptions.decode(a.modes, a.nums)
    inputs = (a.hidden, a.weight, a.bias, a.tokens, a.old_logp, a.advantages, a.mask,
              a.normalizer, a.ref_logp, a.is_weights)
    needs = (a.need_hidden, a.need_weight, a.need_bias)
    if a.backend == "triton" and a.path != "triton" and one_pass(o):
        return kernel("linear_grpo_loss_gif_forward", "_linear_gif")(
            *inputs, a.temperature, o, a.head_precision, a.rows, *needs)
    return fused_linear_gif(kernel, inputs, a.temperature, o, a.head_precision, a.path,
                            a.rows, needs)


LINEAR_GRPO_LOSS = Op(
    "linear_grpo_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, Tensor "
    "old_logp, Tensor advantages, Tensor mask, Tensor? normalizer, Tensor? ref_logp, "
    "Tensor? is_weights, float temperature, str modes, float[] nums, str backend, str? "
    "head_precision=None, str path='auto', Tensor? rows=None) -> (loss, metrics, logp, "
    "entropy, stats)",
    _FAMILY, backends=_BACKENDS,
    fake=lambda a: grpo_outputs(a.hidden, a.tokens),
    derive=_OPTIONS,
    kernel_args=_GRPO_INPUTS + ("temperature", "options", "head_precision", "path", "rows"),
    differentiable=_HEAD, nondiff=("metrics", "logp", "entropy", "stats"),
    saved=_GRPO_INPUTS + ("logp", "entropy", "stats", "rows"),
    backward=Backward(("grad_loss",) + _GRPO_INPUTS
                      + ("logp", "entropy", "stats", "temperature", "options",
                         "head_precision", "path", "rows"), grads=_HEAD),
    parallel=Parallel(
        _linear_grpo_loss_parallel, backends=_BACKENDS, extra_outputs=("local_tokens",),
        extra_fake=lambda a: (a.hidden.new_empty(a.tokens.shape, dtype=torch.int64),),
        save_as={"tokens": "local_tokens"}, reduce=_reduce_hidden),
    # grad_in_forward=True: the forward also forms d loss / d (hidden, weight, bias) for 1
    grad_in_forward=GradInForward(_linear_grpo_loss_gif, family="_linear_gif", loss="loss",
                                  wrt=_HEAD),
    # the eager Function returns (loss, metrics) only: linear_grpo_loss reads nothing else
    eager_outputs=2)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, tokens: Tensor, old_logp: Tensor,
                     advantages: Tensor, mask: Tensor, *, bias: Optional[Tensor] = None,
                     temperature: float = 1.0, ref_logp: Optional[Tensor] = None,
                     entropy_coef: float = 0.0, head_precision: Optional[str] = None,
                     rows: Optional[Tensor] = None, grad_in_forward: bool = False,
                     backend: Optional[str] = None, process_group=None,
                     **policy_loss_options
                     ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`grpo_loss` from hidden states and the lm_head, never materializing the logits.

    ``hidden [B, T, H]``, ``weight [V, H]``, ``bias [V]`` or ``None``, ``tokens [B, T]``
    (``-100`` marks padding), the other inputs and ``policy_loss_options`` as in
    :func:`policy_loss`. The entropy is always computed (``metrics["entropy"]``) and enters
    the loss as ``- entropy_coef * H``. Returns ``(loss, metrics)``; differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``. ``head_precision``: the GEMMs' operand precision,
    as in :func:`linear_token_logprobs`.

    ``rows`` (int64 ``[R]``, distinct flat indices into ``B * T``, e.g. the response
    positions): only those positions go through the lm_head GEMMs; every other position is
    left out of the loss and the metrics, as if ``mask`` were 0 there (so a position outside
    ``rows`` never contributes a log-prob it did not compute). No host sync.

    ``process_group``: vocabulary (tensor) parallelism, as in :func:`linear_token_logprobs`
    (``weight`` / ``bias`` are this rank's shard, every other input is the same on every
    rank): the loss and metrics are the unsharded ones on every rank; ``d weight`` and ``d
    bias`` are this rank's shards, computed locally; ``d hidden`` is the unsharded gradient
    on every rank, summed over the group by the one all-reduce of backward.

    ``grad_in_forward=True`` forms ``d loss / d hidden``, ``d weight`` and ``d bias`` in the
    forward, for an upstream gradient of 1, while each chunk of logits is alive: the
    backward only multiplies them by the upstream scalar (nothing when it is exactly 1)
    and reads neither ``hidden`` nor ``weight``. On the triton backend (a GPU) with a loss
    whose per-token gradient is the token's own (``ratio_level="token"`` and ``loss`` one of
    ppo, cispo, reinforce, sapo, dro, luspo, dppo_tv, dppo_kl; any KL estimator,
    ``entropy_coef``, ``agg``, ``normalizer``, ``rows``, ``head_precision``) the forward
    walks the row chunks once: logits by cuBLAS (GEMM 1), log-probs and entropies, the
    per-token policy gradient (the aggregation weights come from the mask, on device), ``d
    z`` over the logits chunk, ``d hidden_c = d z_c W`` (GEMM 2) and ``d W += d z_c^T h_c``
    (GEMM 3): three GEMMs instead of four. Every other case (sequence-level ratios / gspo,
    gmpo, vespo, clip_cov, kl_cov; the torch backend; the private triton-kernel path) falls
    back to the composition: the usual forward, then the usual backward with gradient 1
    inside the forward (four GEMMs, the same results and the same backward-reads-nothing
    behaviour). Memory: the three gradients are allocated by the forward and live until the
    backward hands them to autograd; the chunk loop holds an fp32 ``[V, H]`` accumulator
    for ``d weight`` (``V x H x 4`` bytes: 2.03 GiB at V=151936, H=3584; with fp32
    weights it is the returned gradient itself), plus the ``[C, V]`` logits chunk (fp32, at
    most 512 MiB; and a bf16 copy of ``d z`` for bf16 inputs), model in
    benchmarks/NOTES.md. A ``weight`` (or ``hidden``, ``bias``) that does not require grad
    gets no gradient and no work (a frozen lm_head: no ``[V, H]`` accumulator). Only the
    loss is differentiable; the graph is backpropagated once. Off by default, and not with
    ``process_group`` (ValueError). Formulas: docs/math.md, "linear_grpo_loss: the gradient
    in the forward".
    """
    if not (_valid_linear(hidden, weight, bias, tokens) and hidden.dim() == 3):
        _check_linear(hidden, weight, bias)
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected a 3-d tensor [B, T, H], got shape "
                             f"{tuple(hidden.shape)}")
        check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    # the flags' common case inline (a check call costs ~0.3 us per op call)
    if type(grad_in_forward) is not bool:
        _checks.flag("grad_in_forward", grad_in_forward)
    if grad_in_forward and process_group is not None:
        raise ValueError("grad_in_forward: expected False with a process_group (the "
                         "vocabulary-parallel linear_grpo_loss forms no gradient in the "
                         "forward), got True")
    # private: the benchmarks' path choice
    path = policy_loss_options.pop("_path", "auto") if policy_loss_options else "auto"
    if head_precision is not None or path != "auto":
        _check_head_options(head_precision, path)
    if rows is not None:
        _check_rows(rows, hidden, process_group)
    handle = _check_group_tokens(process_group, tokens, weight, -100)
    if rows is not None:
        # the positions outside rows leave the loss and the metrics (a select on device)
        _checks.tensor("mask", mask)
        _checks.shape("mask", mask, tuple(tokens.shape), "the shape of tokens, [B, T]")
        kept = torch.zeros(tokens.numel(), dtype=torch.bool, device=tokens.device)
        mask = torch.where(kept.index_fill_(0, rows.to(tokens.device), True)
                           .view(tokens.shape), mask, torch.zeros((), dtype=mask.dtype,
                                                                  device=mask.device))
    _, modes, nums, norm, is_weights, mask, rollout = fused_policy_inputs(
        "linear_grpo_loss", policy_loss_options, tokens, old_logp, advantages, mask, ref_logp,
        entropy_coef, backend)
    name = LINEAR_GRPO_LOSS.resolve(backend, hidden, handle is not None)
    value, metrics = LINEAR_GRPO_LOSS(
        hidden, weight, bias, tokens, old_logp, advantages, mask, norm, ref_logp, is_weights,
        t, modes, nums, name, head_precision, path, rows, group=handle,
        grad_in_forward=grad_in_forward, maps=_HIDDEN_ROWS)[:2]
    metrics = metrics_dict(metrics, ref_logp is not None, True)
    if rollout:
        metrics.update(rollout)
    return value, metrics


# the op's map of hidden [..., H] to its [N, H] rows (a view, or one copy); and of the
# tokens [...] to [N] (linear_token_logprobs)
_HIDDEN_ROWS = ((0, as_rows),)
_HIDDEN_TOKEN_ROWS = ((0, as_rows), (3, as_flat))
