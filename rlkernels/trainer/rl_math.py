"""The RL math of one GRPO step, twice: plain PyTorch (``--ops torch``) and rlkernels
(``--ops kernels``), behind one interface so that the loop cannot tell them apart.

:class:`TorchMath` is what a trainer writes without rlkernels, the way TRL and verl do it:
``log_softmax`` of the fp32 logits, ``gather``, entropy from ``softmax``, advantages with
``view(-1, G)``, the clipped surrogate in elementwise ops. It materializes several ``[B, C, V]``
fp32 tensors; it is the independent baseline the kernels are compared with.

:class:`KernelMath` calls :func:`rlkernels.token_logprobs`, :func:`rlkernels.group_advantages`
and :func:`rlkernels.grpo_loss` (or, with ``fused_head``, :func:`rlkernels.linear_token_logprobs`
and :func:`rlkernels.linear_grpo_loss`, which never materialize the logits).

Both compute, per completion token with ``r = exp(clamp(logp - old_logp, +-20))``::

    L = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef * KL_est(logp, ref_logp)
        - entropy_coef * H
    loss = sum(mask * L) / normalizer        (agg="token-mean"; see policy_loss for the others)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import rlkernels

from .model import completion_hidden, completion_logits

__all__ = ["Batch", "LossOptions", "TorchMath", "KernelMath", "make_math"]

Tensor = torch.Tensor


@dataclass
class Batch:
    """One rollout: ``input_ids``/``attention_mask`` ``[B, P + C]`` (left-padded prompts, then
    completions); ``tokens``/``mask`` ``[B, C]`` the completion ids and which of them count
    (up to and including the first eos); ``rewards [B]``; groups are ``group_size``
    consecutive rows."""
    input_ids: Tensor
    attention_mask: Tensor
    tokens: Tensor
    mask: Tensor
    rewards: Tensor
    group_size: int

    def rows(self, index: Tensor) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.tokens[index],
                     self.mask[index], self.rewards[index], self.group_size)


@dataclass(frozen=True)
class LossOptions:
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    adv_method: str = "grpo"
    adv_eps: float = 1e-6


class TorchMath:
    """Plain PyTorch (materializes ``[B, C, V]`` fp32 log-softmax and probabilities)."""

    name = "torch"

    def __init__(self, fused_head: bool = False, backend: Optional[str] = None):
        del fused_head, backend  # the plain path always goes through the logits

    @staticmethod
    def _log_softmax(model, batch: Batch, temperature: float) -> Tensor:
        logits = completion_logits(model, batch.input_ids, batch.attention_mask,
                                   batch.tokens.shape[1])
        return torch.log_softmax(logits.float() / temperature, dim=-1)

    def logprobs(self, model, batch: Batch, temperature: float) -> Tensor:
        logp_all = self._log_softmax(model, batch, temperature)
        return logp_all.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)

    def advantages(self, rewards: Tensor, group_size: int, opts: LossOptions) -> Tensor:
        r = rewards.double().view(-1, group_size)
        mean = r.mean(-1, keepdim=True)
        if opts.adv_method == "grpo":
            std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
            adv = (r - mean) / (std + opts.adv_eps)
        elif opts.adv_method == "dr_grpo":
            adv = r - mean
        elif opts.adv_method == "rloo":
            adv = (r - mean) * group_size / (group_size - 1) if group_size > 1 else r * 0
        else:  # batch_std
            adv = (r - mean) / (r.std() + opts.adv_eps)
        if group_size == 1:
            adv = torch.zeros_like(adv)
        return adv.view(-1).to(rewards.dtype)

    def loss(self, model, batch: Batch, adv: Tensor, old_logp: Tensor,
             ref_logp: Optional[Tensor], normalizer: Tensor, opts: LossOptions
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
        logp_all = self._log_softmax(model, batch, opts.temperature)
        logp = logp_all.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(opts.entropy_coef != 0 and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(-1)
        mask = batch.mask.float()
        a = adv.float().unsqueeze(-1)
        ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
        clip_high = opts.clip_low if opts.clip_high is None else opts.clip_high
        clipped = torch.clamp(ratio, 1 - opts.clip_low, 1 + clip_high)
        per_token = -torch.minimum(ratio * a, clipped * a)
        metrics = {}
        if ref_logp is not None:
            d = logp - ref_logp
            kl = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}[opts.kl_estimator]
            per_token = per_token + opts.kl_coef * kl
            metrics["kl"] = _masked_mean(kl.detach(), mask)
        per_token = per_token - opts.entropy_coef * ent
        loss = _aggregate(per_token, mask, opts.agg, normalizer)
        high = (a > 0) & (ratio > 1 + clip_high)
        low = (a < 0) & (ratio < 1 - opts.clip_low)
        metrics["clipfrac"] = _masked_mean((high | low).float(), mask)
        metrics["entropy"] = _masked_mean(ent.detach(), mask)
        return loss, metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def _aggregate(per_token: Tensor, mask: Tensor, agg: str, normalizer: Tensor) -> Tensor:
    masked = per_token * mask
    if agg == "seq-mean-token-mean":
        masked = masked / mask.sum(-1, keepdim=True).clamp_min(1)
    return masked.sum() / normalizer


class KernelMath:
    """rlkernels ops (``fused_head``: straight from the hidden states and the lm_head)."""

    name = "kernels"

    def __init__(self, fused_head: bool = False, backend: Optional[str] = None):
        self.fused_head = fused_head
        self.backend = backend

    def logprobs(self, model, batch: Batch, temperature: float) -> Tensor:
        n = batch.tokens.shape[1]
        if self.fused_head:
            hidden, weight, bias = completion_hidden(model, batch.input_ids,
                                                     batch.attention_mask, n)
            return rlkernels.linear_token_logprobs(hidden, weight, batch.tokens, bias=bias,
                                                   temperature=temperature,
                                                   backend=self.backend)
        logits = completion_logits(model, batch.input_ids, batch.attention_mask, n)
        return rlkernels.token_logprobs(logits, batch.tokens, temperature=temperature,
                                        backend=self.backend)

    def advantages(self, rewards: Tensor, group_size: int, opts: LossOptions) -> Tensor:
        return rlkernels.group_advantages(rewards, group_size=group_size,
                                          method=opts.adv_method, eps=opts.adv_eps,
                                          backend=self.backend)

    def loss(self, model, batch: Batch, adv: Tensor, old_logp: Tensor,
             ref_logp: Optional[Tensor], normalizer: Tensor, opts: LossOptions
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
        n = batch.tokens.shape[1]
        kwargs = dict(temperature=opts.temperature, ref_logp=ref_logp,
                      entropy_coef=opts.entropy_coef, backend=self.backend,
                      clip_low=opts.clip_low, clip_high=opts.clip_high,
                      kl_coef=opts.kl_coef if ref_logp is not None else 0.0,
                      kl_estimator=opts.kl_estimator, agg=opts.agg, normalizer=normalizer)
        if self.fused_head:
            hidden, weight, bias = completion_hidden(model, batch.input_ids,
                                                     batch.attention_mask, n)
            loss, metrics = rlkernels.linear_grpo_loss(
                hidden, weight, batch.tokens, old_logp, adv, batch.mask.float(), bias=bias,
                **kwargs)
        else:
            logits = completion_logits(model, batch.input_ids, batch.attention_mask, n)
            loss, metrics = rlkernels.grpo_loss(logits, batch.tokens, old_logp, adv,
                                                batch.mask.float(), **kwargs)
        keep = ("clipfrac", "entropy") + (("kl",) if ref_logp is not None else ())
        return loss, {k: metrics[k] for k in keep}


def make_math(ops: str, fused_head: bool = False, backend: Optional[str] = None):
    if ops == "torch":
        return TorchMath(fused_head, backend)
    if ops == "kernels":
        return KernelMath(fused_head, backend)
    raise ValueError(f"ops: expected 'torch' or 'kernels', got {ops!r}")
