"""rlkernels: fused, exact, memory-flat kernels for RL post-training of language models.

The public API is exactly the one of SPEC.md; everything else is private.
"""

from ._version import __version__
from ._checks import set_debug
from .backends import available_backends, set_backend
from .ops.advantage import discounted_returns, gae, group_advantages, masked_whiten
from .ops.linear import linear_grpo_loss, linear_sparse_logprobs, linear_token_logprobs
from .ops.policy import grpo_loss, kl_penalty, policy_loss
from .ops.rollout import rollout_correction
from .ops.sparse import sampling_support, sparse_kl, sparse_logprobs
from .ops.vocab import entropy, kl_divergence, token_logprobs

__all__ = [
    "__version__", "available_backends", "set_backend", "set_debug",
    "token_logprobs", "entropy", "sparse_logprobs", "sampling_support", "sparse_kl",
    "kl_divergence", "kl_penalty", "policy_loss", "grpo_loss",
    "linear_token_logprobs", "linear_sparse_logprobs", "linear_grpo_loss",
    "group_advantages", "masked_whiten", "gae", "discounted_returns",
    "rollout_correction",
]
