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
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])`` (``[B, T, 3]`` when
    the vocabulary kernel takes ``[B, T, V]`` logits: its ``ND_ROWS``).

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



def fused_forward_gif(kernel: Callable, logits: Tensor, tokens: Tensor, old_logp: Tensor,
                      advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                      ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                      temperature: float, o: PolicyOptions, out: Optional[Tensor]):
    """``grpo_loss`` with the gradient formed in the forward (``grad_in_forward=True``):
    ``(loss, metrics, logp, entropy, stats, d loss / d logits)`` for an upstream gradient of
    1, composed from the backend's kernels (``kernel(fn, family=None)``): the fused forward,
    then :func:`forward_grad`. Token- and sequence-level ratios alike: the forward has every
    per-token quantity the policy backward needs. Three passes over the logits; the cuda
    backend's one-read kernel (rlkernels/cuda/grpo.py) replaces this where it applies."""
    loss, metrics, logp, ent, stats = kernel("grpo_loss_forward")(
        logits, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
        temperature, o)
    grad = forward_grad(kernel, logits, tokens, loss, logp, ent, stats, old_logp, advantages,
                        mask, normalizer, ref_logp, is_weights, temperature, o, out)
    return loss, metrics, logp, ent, stats, grad


def forward_grad(kernel: Callable, logits: Tensor, tokens: Tensor, loss: Tensor, logp: Tensor,
                 ent: Tensor, stats: Tensor, old_logp: Tensor, advantages: Tensor,
                 mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                 is_weights: Optional[Tensor], temperature: float, o: PolicyOptions,
                 out: Optional[Tensor]) -> Tensor:
    """``d loss / d logits`` for an upstream gradient of 1 from the forward's outputs: the
    policy backward with ``grad_loss = 1``, then the vocabulary backward, which writes into
    ``out`` (``logits`` itself for the in-place form: it reads each row block before it
    writes it) or a new buffer. ``tokens`` may be shard-local ids with the all-shard
    ``stats`` (vocabulary parallelism): the gradient of this rank's shard."""
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    g_lp, g_ent = row_grads(kernel("policy_loss_backward"), one, logp, ent, old_logp,
                            advantages, mask, normalizer, ref_logp, is_weights, o)
    return kernel("token_logprobs_backward", "vocab")(
        g_lp, g_ent, logits, tokens.reshape(-1), stats, temperature, -100, out=out)


# the losses whose per-token gradient d L_t / d logp_t depends on the token's own values
# only (with token-level ratios); gmpo, vespo (sequence weights) and clip_cov / kl_cov (a
# selection over the whole batch) need every token of the batch first
ONE_PASS_LOSSES = ("ppo", "cispo", "reinforce", "sapo", "dro", "luspo", "dppo_tv", "dppo_kl")


def one_pass(o: PolicyOptions) -> bool:
    """Whether a chunked forward can form each chunk's gradient as it goes: a loss of
    :data:`ONE_PASS_LOSSES` with ``ratio_level="token"`` (every KL estimator and the entropy
    term are per token; the aggregation weights come from the mask alone)."""
    return o.ratio_level == "token" and o.loss in ONE_PASS_LOSSES


def fused_linear_gif(kernel: Callable, inputs: Tuple, temperature: float, o: PolicyOptions,
                     head_precision: Optional[str], path: str, rows: Optional[Tensor],
                     needs: Tuple[bool, bool, bool]):
    """``linear_grpo_loss`` with the gradient formed in the forward, composed from the
    backend's kernels: its fused forward, then its backward with ``grad_loss = 1`` (four
    GEMMs: the backward recomputes the logits). ``inputs``: ``(hidden, weight, bias, tokens,
    old_logp, advantages, mask, normalizer, ref_logp, is_weights)``. Returns the forward's
    outputs, then ``d hidden``, ``d weight``, ``d bias`` in their inputs' dtypes (an empty
    tensor for one not needed, ``needs``, or without a bias)."""
    loss, metrics, logp, ent, stats = kernel("linear_grpo_loss_forward")(
        *inputs, temperature, o, head_precision, path, rows)
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    grads = kernel("linear_grpo_loss_backward")(one, *inputs, logp, ent, stats, temperature,
                                                o, head_precision, path, rows)
    out = []
    for x, g, need in zip(inputs[:3], grads, needs):
        # (a fresh empty tensor each: a custom op's outputs may not alias one another)
        out.append(inputs[1].new_empty(0) if x is None or g is None or not need
                   else g.to(x.dtype))
    return (loss, metrics, logp, ent, stats, *out)
