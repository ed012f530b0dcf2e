"""Rollouts and the GRPO update.

One step: ``prompts`` prompts, ``group_size`` samples each (``generate`` with temperature,
top-k, top-p); rewards; group advantages; old log-probs (current policy) and reference
log-probs (the frozen initial model, only with ``kl_coef > 0``) without gradient; then
``ppo_epochs`` passes over ``minibatches`` minibatches, each an AdamW step on the clipped
surrogate (:mod:`rlkernels.trainer.rl_math`) after gradient-norm clipping.

Data parallel (``torchrun``): every rank samples its own prompts, so a group never spans
ranks; loss normalizers (token or sequence counts) are all-reduced before the loss, and
gradients are summed, not averaged, across ranks. Two ranks therefore make the same update
as one rank on the concatenation of their minibatches (``adv_method="batch_std"`` excepted:
its batch std is the rank's own).
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .rl_math import Batch, LossOptions

__all__ = ["rollout", "old_and_ref_logprobs", "normalizer", "policy_update"]

Tensor = torch.Tensor


def _left_pad(seqs: Sequence[List[int]], pad: int, device) -> Tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completion: Tensor, eos_id: int) -> Tensor:
    """1 up to and including the first eos of each row, 0 after it (all 1 without eos)."""
    is_eos = (completion == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # eos seen strictly before this position
    return (before == 0).long()


@torch.no_grad()
def rollout(model, tokenizer, pairs: Sequence[Tuple[str, str]], group_size: int, *,
            max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
            top_p: float = 1.0) -> Tuple[Batch, List[str]]:
    """Sample ``group_size`` completions per ``(prompt, answer)`` pair and score them with
    :func:`~rlkernels.trainer.tasks.char_reward`. Returns the batch and the completion texts."""
    from .tasks import char_reward

    device = next(model.parameters()).device
    prompts = [tokenizer.encode(p) for p, _ in pairs for _ in range(group_size)]
    answers = [a for _, a in pairs for _ in range(group_size)]
    ids, attn = _left_pad(prompts, tokenizer.pad_token_id, device)
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                         temperature=temperature, top_k=top_k or 0, top_p=top_p,
                         max_new_tokens=max_new_tokens, min_new_tokens=1,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    completion = out[:, ids.shape[1]:]
    mask = completion_mask(completion, tokenizer.eos_token_id)
    texts = []
    for row, m in zip(completion.tolist(), mask.tolist()):
        kept = [t for t, k in zip(row, m) if k and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept))
    rewards = torch.tensor([char_reward(t, a) for t, a in zip(texts, answers)],
                           dtype=torch.float32, device=device)
    completion = torch.where(mask.bool(), completion, tokenizer.pad_token_id)
    batch = Batch(out, torch.cat([attn, mask], dim=1), completion, mask, rewards, group_size)
    return batch, texts


@torch.no_grad()
def old_and_ref_logprobs(math, model, ref_model, batch: Batch, opts: LossOptions
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    old = math.logprobs(model, batch, opts.temperature)
    ref = math.logprobs(ref_model, batch, opts.temperature) \
        if ref_model is not None and opts.kl_coef != 0 else None
    return old, ref


def normalizer(mask: Tensor, agg: str, horizon: int, group=None) -> Tensor:
    """The global divisor of ``agg``: token count (``token-mean``), count of non-empty
    sequences (``seq-mean-*``), or the constant ``horizon`` = ``max_new_tokens``
    (``seq-mean-token-sum-norm``, Dr. GRPO); summed over the data-parallel ranks."""
    if agg == "seq-mean-token-sum-norm":
        return torch.tensor(float(horizon), device=mask.device)
    if agg == "token-mean":
        count = mask.float().sum()
    else:
        count = (mask.sum(-1) > 0).float().sum()
    if group is not None:
        import torch.distributed as dist
        dist.all_reduce(count, group=group)
    return count.clamp_min(1.0)


def _sum_gradients(params: Sequence[torch.nn.Parameter], group) -> None:
    # Summed, not averaged: the loss is already divided by the global normalizer.
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def minibatch_indices(n: int, minibatches: int, device) -> List[Tensor]:
    if not 1 <= minibatches <= n:
        raise ValueError(f"minibatches: expected 1 to {n} (the rollout's row count), "
                         f"got {minibatches}")
    return [idx.to(device) for idx in torch.arange(n).chunk(minibatches)]


def policy_update(math, model, optimizer, batch: Batch, adv: Tensor, old_logp: Tensor,
                  ref_logp: Optional[Tensor], opts: LossOptions, *, ppo_epochs: int = 1,
                  minibatches: int = 1, max_grad_norm: float = 1.0, horizon: int,
                  group=None) -> List[Dict[str, float]]:
    """``ppo_epochs x minibatches`` optimizer steps; one record per step with ``loss``,
    ``grad_norm`` (before clipping) and the loss metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    records = []
    for _ in range(ppo_epochs):
        for idx in minibatch_indices(batch.tokens.shape[0], minibatches, adv.device):
            mb = batch.rows(idx)
            norm = normalizer(mb.mask, opts.agg, horizon, group)
            loss, metrics = math.loss(model, mb, adv[idx], old_logp[idx],
                                      None if ref_logp is None else ref_logp[idx], norm, opts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if group is not None:
                _sum_gradients(params, group)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            record = {"loss": loss.detach(), "grad_norm": grad_norm.detach(), **metrics}
            records.append({k: float(v) for k, v in record.items()})
    return records


def seeded_rng(seed: int, rank: int) -> random.Random:
    return random.Random(seed * 1_000_003 + rank)
