"""Launchers for csrc/policy.cu: ``policy_loss`` and ``grpo_loss`` (ops on per-token
log-probs). Private API.

A launcher allocates the outputs and hands raw pointers, sizes, option codes and the current
CUDA stream to rlkernels._C. No autograd here: the custom ops in rlkernels/ops/ wrap these.
(``kl_penalty`` has no kernel: its public function runs the torch formula in every backend.)
"""

from __future__ import annotations

import torch

from rlkernels import _codes
from rlkernels.cuda._common import DTYPE_CODES as _DTYPE_CODES
from rlkernels.cuda._common import expect, matrix, ptr, stream_of
from rlkernels.cuda._common import extension as _extension

# ============================================================================== policy_loss

# Codes of PolicyParams (rlkernels/_codes.py = csrc/rlkernels.h).
_LOSSES = _codes.POLICY_LOSSES
_AGGS = _codes.AGGS
_KLS = _codes.KL_ESTIMATORS
N_METRICS = 9  # rlkernels.reference.policy.METRICS
_N_PARTIALS = 12  # csrc/policy.cu kPartials


def _policy_inputs(logp, old_logp, advantages, mask, normalizer, ref_logp, entropy,
                   is_weights, o=None):
    """Check the [B, T] inputs and bring them to the compute dtype (a copy only when the
    dtype differs; [B, T] tensors are small next to logits). Returns (cdt, tensors,
    _C.PolicyTensors of them, normalizer); the tensors must outlive the launch. For clip_cov
    / kl_cov (options ``o``) the covariance-selected tokens are chosen here, on the device
    and without a host synchronisation, by the reference's ``cov_selection`` (a stable sort
    between the launches), and travel as ``PolicyTensors.select``."""
    expect("logp", logp, _FLOAT_DTYPES, ndim=2)
    b, t = logp.shape
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    out = {"logp": logp.to(cdt)}
    for name, x, dtypes in (("old_logp", old_logp, _FLOAT_DTYPES),
                            ("mask", mask, _FLOAT_DTYPES + _MASK_INT_DTYPES),
                            ("ref_logp", ref_logp, _FLOAT_DTYPES),
                            ("entropy", entropy, _FLOAT_DTYPES),
                            ("is_weights", is_weights, _FLOAT_DTYPES)):
        if x is None:
            out[name] = None
            continue
        expect(name, x, dtypes, shape=(b, t), like=logp)
        out[name] = x.to(cdt)
    expect("advantages", advantages, _FLOAT_DTYPES, like=logp)
    expect("advantages", advantages, _FLOAT_DTYPES, shape=(b,) if advantages.dim() == 1 else (b, t))
    adv = advantages.to(cdt)
    out["adv"] = adv
    norm = None
    if normalizer is not None:
        expect("normalizer", normalizer, _FLOAT_DTYPES + _MASK_INT_DTYPES, like=logp)
        norm = normalizer.reshape(1).to(cdt)  # one element (reshape raises otherwise)

    C = _extension()
    pt = C.PolicyTensors(
        logp=matrix(C, out["logp"]), old_logp=matrix(C, out["old_logp"]),
        adv=matrix(C, adv, stride1=0 if adv.dim() == 1 else None),  # [B]: one value per row
        mask=matrix(C, out["mask"]), ref_logp=matrix(C, out["ref_logp"]),
        entropy=matrix(C, out["entropy"]), is_weights=matrix(C, out["is_weights"]), B=b, T=t)
    if o is not None and o.loss in ("clip_cov", "kl_cov"):
        from ..reference.policy import cov_selection

        out["select"] = cov_selection(out["logp"], out["old_logp"], adv, out["mask"],
                                      o).to(cdt).contiguous()
        pt.select = matrix(C, out["select"])
    return cdt, out, pt, norm


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# _C.PolicyParams per (options, has_ref, has_ent, has_w): a training loop uses a few.
_PARAMS: dict = {}


def _policy_params(C, o, has_ref: bool, has_ent: bool, has_w: bool):
    key = (o, has_ref, has_ent, has_w)
    params = _PARAMS.get(key)
    if params is not None:
        return params
    ppo = _LOSSES[o.loss] == _LOSSES["ppo"]  # ppo and its alias luspo
    has_dual = ppo and o.dual_clip is not None
    has_delta = ppo and o.delta is not None
    lo, hi = o.kernel_bounds
    pos_a, neg_a, pos_b, neg_b, coef = o.loss_scalars
    params = C.PolicyParams()
    for name, value in (
            ("loss", _LOSSES[o.loss]), ("seq", _codes.RATIO_LEVELS[o.ratio_level]),
            ("agg", _AGGS[o.agg]), ("kl_estimator", _KLS[o.kl_estimator]),
            ("has_ref", int(has_ref)), ("has_ent", int(has_ent)), ("has_w", int(has_w)),
            ("has_dual", int(has_dual)), ("has_delta", int(has_delta)),
            ("use_kl", int(has_ref and o.kl_coef != 0.0)),
            ("use_ent", int(has_ent and o.entropy_coef != 0.0)),
            # lo: the ratio's lower clamp (ppo; cispo with cispo_clip_low; 0 for TRL's cispo);
            # gmpo / dppo: clip_low, clip_high as they are (PolicyOptions.kernel_bounds)
            ("lo", float(lo)), ("hi", float(hi)),
            ("dual_clip", float(o.dual_clip or 0.0)), ("delta", float(o.delta or 0.0)),
            ("kl_coef", float(o.kl_coef)), ("entropy_coef", float(o.entropy_coef)),
            ("log_ratio_clamp", float(o.log_ratio_clamp)),
            ("pos_a", float(pos_a)), ("neg_a", float(neg_a)), ("pos_b", float(pos_b)),
            ("neg_b", float(neg_b)), ("coef", float(coef))):
        setattr(params, name, value)
    if len(_PARAMS) >= 1024:
        _PARAMS.clear()
    _PARAMS[key] = params
    return params


def policy_loss_forward(logp, old_logp, advantages, mask, normalizer, ref_logp, entropy,
                        is_weights, o):
    """Returns ``(loss [], metrics [9] fp32)`` as the reference: a per-sequence kernel (one
    block per row: its masked sums) and a one-block kernel that sums the rows in a fixed
    order (deterministic, no atomics)."""
    C = _extension()
    cdt, t, pt, norm = _policy_inputs(logp, old_logp, advantages, mask, normalizer, ref_logp,
                                      entropy, is_weights, o)
    b, tt = logp.shape
    params = _policy_params(C, o, ref_logp is not None, entropy is not None,
                            is_weights is not None)
    loss = torch.empty((), dtype=cdt, device=logp.device)
    metrics = torch.empty(N_METRICS, dtype=torch.float32, device=logp.device)
    partials = torch.empty(max(b, 1), _N_PARTIALS, dtype=cdt, device=logp.device)
    with torch.cuda.device(logp.device):
        C.policy_loss_forward(tensors=pt, params=params, normalizer=ptr(norm),
                              partials=partials.data_ptr(), loss=loss.data_ptr(),
                              metrics=metrics.data_ptr(), dtype=_DTYPE_CODES[cdt],
                              stream=stream_of(logp))
    return loss, metrics


def policy_loss_backward(grad_loss, logp, old_logp, advantages, mask, normalizer, ref_logp,
                         entropy, is_weights, o):
    """Gradients w.r.t. ``logp`` (its dtype) and ``entropy`` (its dtype, ``None`` when not
    given), contiguous ``[B, T]``."""
    C = _extension()
    cdt, t, pt, norm = _policy_inputs(logp, old_logp, advantages, mask, normalizer, ref_logp,
                                      entropy, is_weights, o)
    b, tt = logp.shape
    expect("grad_loss", grad_loss, _FLOAT_DTYPES, like=logp)
    params = _policy_params(C, o, ref_logp is not None, entropy is not None,
                            is_weights is not None)
    g_lp = torch.empty((b, tt), dtype=cdt, device=logp.device)
    g_ent = None if entropy is None else torch.empty((b, tt), dtype=cdt, device=logp.device)
    if b * tt > 0:
        g = grad_loss.reshape(1).to(cdt)  # one element (reshape raises otherwise)
        workspace = torch.empty(2 * b + 1, dtype=cdt, device=logp.device)
        with torch.cuda.device(logp.device):
            C.policy_loss_backward(tensors=pt, params=params, normalizer=ptr(norm),
                                   grad_loss=g.data_ptr(), workspace=workspace.data_ptr(),
                                   g_lp=g_lp.data_ptr(), g_ent=ptr(g_ent),
                                   dtype=_DTYPE_CODES[cdt], stream=stream_of(logp))
    g_lp = g_lp.to(logp.dtype)
    if g_ent is not None:
        g_ent = g_ent.to(entropy.dtype)
    return g_lp, g_ent


# =============================================================================== grpo loss

def grpo_loss_forward(logits, tokens, old_logp, advantages, mask, normalizer, ref_logp,
                      is_weights, temperature, o):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``: the vocabulary
    kernel (log-probs and entropies in one pass over the logits) then the policy kernels
    (the composition of rlkernels/_fused.py, shared by every backend)."""
    from .._fused import fused_forward
    from .vocab import token_logprobs_forward

    return fused_forward(
        lambda tok: token_logprobs_forward(logits, tok, temperature, -100, True),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def grpo_loss_backward(grad_loss, logits, tokens, old_logp, advantages, mask, normalizer,
                       ref_logp, is_weights, logp, ent, stats, temperature, o, inplace):
    """``d loss / d logits``: the policy gradients w.r.t. the log-probs (and entropies when
    ``entropy_coef != 0``) pushed through the vocabulary backward kernel in one pass;
    ``inplace`` writes them into ``logits``."""
    from .._fused import row_grads
    from .vocab import token_logprobs_backward

    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp, advantages,
                            mask, normalizer, ref_logp, is_weights, o)
    return token_logprobs_backward(g_lp, g_ent, logits, tokens.reshape(-1), stats, temperature,
                                   -100, out=logits if inplace else None)
