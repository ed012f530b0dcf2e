"""Launchers for csrc/grpo.cu: ``grpo_loss(..., grad_in_forward=True)``. Private API.

``grpo_loss_gif_forward`` runs the one-read kernel (sm_90a: a thread-block cluster holds a
row in distributed shared memory, loaded once by TMA bulk copies; see csrc/grpo.cu) and
returns ``(loss, metrics, logp [B, T], entropy [B, T], stats [N, 3], d loss / d logits)`` for
an upstream gradient of 1, or ``None`` where that kernel does not apply, and the caller
(rlkernels/ops/policy.py) composes the three-pass kernels instead (rlkernels/_fused.py):

* an extension built without it, a device below sm_90, a row too long for a cluster (the
  C++ side plans the cluster size: ``grpo_gif_plan``);
* sequence-level ratios (GSPO: a token's ratio needs its whole sequence's log-probs first)
  and losses other than ppo / cispo / reinforce, KL estimators other than k1 / abs / k2 /
  k3 / k3+ (the per-token formula lives in csrc/grpo.cu; a loss or estimator added to
  policy.cu falls back here until it is added there);
* rows the bulk copies cannot address: 16-byte aligned rows of ``V * sizeof(T) % 16 == 0``
  bytes with unit column stride (``V = 151936`` bf16 / fp32 qualifies).

The aggregation weight of each token (``mask / denominator``, ``/ token count`` for
``seq-mean-token-mean``; what policy.cu's policy_grad_kernel multiplies by) is formed
before the launch by a few elementwise torch ops on the ``[B, T]`` mask: it does not depend
on the logits. The loss and the metrics come from the policy kernels on the kernel's
log-probs and entropies, as in the three-pass forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import grpo as _reference
from ._common import DTYPE_CODES, compute_dtype, expect, extension, matrix, ptr, rows, \
    stream_of

Tensor = torch.Tensor

# losses and KL estimators whose per-token gradient csrc/grpo.cu implements (gif_token_grad)
ONE_READ_LOSSES = ("ppo", "cispo", "reinforce")
ONE_READ_KL = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+")
# grpo_gif_plan's answer per (device, vocab, dtype code)
_PLANS: dict = {}


def _aligned(t: Tensor) -> bool:
    """Rows a bulk copy can read / 16-byte stores can write: unit column stride, 16-byte
    aligned start, row stride and row length."""
    e = t.element_size()
    return (t.dim() == 2 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * e) % 16 == 0 and (t.shape[1] * e) % 16 == 0)


def token_weights(mask: Tensor, normalizer: Optional[Tensor], agg: str,
                  cdt: torch.dtype) -> Tensor:
    """``[B, T]`` weight of each token in the aggregated loss (the ``c`` of policy.cu's
    policy_grad_kernel for an upstream gradient of 1): ``m / denom``, and for
    ``seq-mean-token-mean`` also ``/ n_b`` (0 for an empty sequence); ``denom`` =
    normalizer, or sum m (token-mean), or T (seq-mean-token-sum-norm), or the number of
    non-empty sequences; a denominator <= 0 counts as 1. No host sync."""
    m = mask.to(cdt)
    count = m.sum(-1, keepdim=True)
    if normalizer is not None:
        denom = normalizer.reshape(()).to(cdt)
    elif agg == "token-mean":
        denom = m.sum()
    elif agg == "seq-mean-token-sum-norm":
        denom = torch.full((), float(m.shape[1]), dtype=cdt, device=m.device)
    else:
        denom = (count > 0).sum().to(cdt)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    w = m / denom
    if agg == "seq-mean-token-mean":
        w = torch.where(count > 0, w / torch.where(count > 0, count, 1.0), 0.0)
    return w.contiguous()


def grpo_loss_gif_forward(logits, tokens, old_logp, advantages, mask, normalizer, ref_logp,
                          is_weights, temperature, o, out):
    """``grpo_loss`` forward with ``d loss / d logits`` (upstream 1) from one read of each
    logit: ``(loss, metrics, logp, entropy, stats, grad)``, ``grad`` written into ``out``
    when given (``logits`` itself: in place), or ``None`` (see the module docstring)."""
    C = extension()
    if not hasattr(C, "grpo_gif_forward"):
        return None  # an extension built before csrc/grpo.cu
    if o.ratio_level != "token" or o.loss not in ONE_READ_LOSSES or (
            ref_logp is not None and o.kl_coef != 0.0 and o.kl_estimator not in ONE_READ_KL):
        return None
    expect("logits", logits, tuple(DTYPE_CODES), ndim=2)
    n, vocab = logits.shape
    b, t = tokens.shape
    if n == 0 or n != b * t or not _aligned(logits) or (out is not None and not _aligned(out)):
        return None
    dtype = DTYPE_CODES[logits.dtype]
    key = (logits.device, vocab, dtype)
    cluster = _PLANS.get(key)
    if cluster is None:  # device attribute queries: once per (device, vocab, dtype)
        with torch.cuda.device(logits.device):
            cluster = _PLANS[key] = C.grpo_gif_plan(vocab=vocab, dtype=dtype)
    if cluster == 0:
        return None
    from .policy import _policy_params, policy_loss_forward

    cdt = compute_dtype(logits.dtype)
    dev = logits.device
    grad = out if out is not None else torch.empty((n, vocab), dtype=logits.dtype, device=dev)
    tok = tokens.reshape(n).to(torch.int64)
    logp = torch.empty((b, t), dtype=cdt, device=dev)
    ent = torch.empty((b, t), dtype=cdt, device=dev)
    stats = torch.empty((n, 3), dtype=cdt, device=dev)
    weight = token_weights(mask, normalizer, o.agg, cdt)
    keep = {name: (None if x is None else x.to(cdt)) for name, x in
            (("old_logp", old_logp), ("ref_logp", ref_logp), ("is_weights", is_weights))}
    adv = advantages.to(cdt)
    pt = C.PolicyTensors(
        logp=matrix(C, logp), old_logp=matrix(C, keep["old_logp"]),
        adv=matrix(C, adv, stride1=0 if adv.dim() == 1 else None),
        mask=matrix(C, weight), ref_logp=matrix(C, keep["ref_logp"]),
        entropy=matrix(C, ent), is_weights=matrix(C, keep["is_weights"]), B=b, T=t)
    params = _policy_params(C, o, ref_logp is not None, True, is_weights is not None)
    with torch.cuda.device(dev):
        C.grpo_gif_forward(logits=rows(C, logits), tokens=rows(C, tok), tensors=pt,
                           params=params, stats=stats.data_ptr(), out=rows(C, grad), n=n,
                           vocab=vocab, dtype=dtype, inv_temperature=1.0 / temperature,
                           ignore_index=-100, cluster=cluster, stream=stream_of(logits))
    loss, metrics = policy_loss_forward(logp, old_logp, advantages, mask, normalizer,
                                        ref_logp, ent, is_weights, o)
    return loss, metrics, logp, ent, stats, grad


def grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place (fp32 product, fp64 for fp64, one rounding); every block reads
    ``g`` on the device and returns at once when it is 1 (no data moves, no host sync). A
    buffer the kernel cannot address (column-strided) or an extension built before
    csrc/grpo.cu: the reference kernel (torch ops, same rounding)."""
    C = extension()
    if grad.numel() == 0:
        return
    x = grad if grad.dim() == 2 else grad.view(-1, grad.shape[-1])
    if not hasattr(C, "grpo_gif_scale") or x.stride(-1) != 1:
        _reference.grpo_loss_gif_scale_(grad, g)
        return
    expect("grad", x, tuple(DTYPE_CODES), ndim=2)
    cdt = compute_dtype(x.dtype)
    scale = g.reshape(1).to(device=x.device, dtype=cdt)
    with torch.cuda.device(x.device):
        C.grpo_gif_scale(grad=rows(C, x), n=x.shape[0], vocab=x.shape[1], g=ptr(scale),
                         dtype=DTYPE_CODES[x.dtype], stream=stream_of(x))

