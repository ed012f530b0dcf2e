"""Launchers for rlkernels._C, the hand-written CUDA C++ backend (`cuda`).

Each launcher validates tensors, allocates outputs and passes raw device pointers, sizes and
the current CUDA stream to the extension. Importing this package never raises; without a built
extension or a GPU, `cuda_status()` says why the backend is unavailable.

Families (the registry, rlkernels/backends.py, finds ``<op>_forward`` in
``rlkernels.cuda.<family>``): vocab (token_logprobs + entropy, kl_divergence), sparse
(sparse_logprobs, sparse_kl), advantage (group_advantages, gae, discounted_returns,
masked_whiten), policy (policy_loss, grpo_loss), rollout (rollout_correction).
"""

from rlkernels.cuda._loader import cuda_status, extension_info, load_extension

__all__ = ["cuda_status", "extension_info", "load_extension"]
