"""The composition shared by every backend's ``grpo_loss`` and ``linear_grpo_loss``: per-token
log-probs and entropies from a vocabulary (or lm_head) kernel, then the policy loss; backward
runs the policy backward and hands its per-token gradients to the vocabulary backward."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._policy_options import PolicyOptions

Tensor = torch.Tensor


def fused_forward(logprobs_forward: Callable, policy_loss_forward: Callable, tokens: Tensor,
                  old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                  is_weights: Optional[Tensor], o: PolicyOptions):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``.

    ``logprobs_forward(flat_tokens)`` returns ``(logp, entropy, stats)`` per row with the
    entropy always computed: it feeds ``metrics["entropy"]`` and the ``entropy_coef`` term."""
    b, t = tokens.shape
    logp, ent, stats = logprobs_forward(tokens.reshape(-1))
    logp, ent = logp.view(b, t), ent.view(b, t)
    loss, metrics = policy_loss_forward(logp, old_logp, advantages, mask, normalizer,
                                        ref_logp, ent, is_weights, o)
    return loss, metrics, logp, ent, stats


def row_grads(policy_loss_backward: Callable, grad_loss: Tensor, logp: Tensor, ent: Tensor,
              old_logp: Tensor, advantages: Tensor, mask: Tensor,
              normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
              is_weights: Optional[Tensor], o: PolicyOptions
              ) -> Tuple[Tensor, Optional[Tensor]]:
    """The policy loss's gradients w.r.t. the per-row log-probs and (only when
    ``entropy_coef != 0``) entropies, flattened to rows for the vocabulary backward."""
    with_entropy = o.entropy_coef != 0.0
    g_lp, g_ent = policy_loss_backward(grad_loss, logp, old_logp, advantages, mask,
                                       normalizer, ref_logp, ent if with_entropy else None,
                                       is_weights, o)
    return g_lp.reshape(-1), None if g_ent is None else g_ent.reshape(-1)
