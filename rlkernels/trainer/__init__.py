"""A thin reference GRPO trainer that validates rlkernels end to end (``rlkernels train``).

It trains a Hugging Face ``transformers`` causal LM on tasks with verifiable rewards and does
all of the RL math with rlkernels ops (``--ops kernels``), with plain PyTorch (``--ops torch``),
or both side by side on the same rollouts (``--ops compare``).

Simplifying assumptions, on purpose:

* rollouts come from ``model.generate`` of the policy being trained (no inference engine), so
  old log-probs are recomputed by the trainer's own forward pass and the first PPO epoch has a
  ratio of exactly 1;
* log-probs are over the full vocabulary at the sampling temperature (as TRL and verl do),
  even when top-k / top-p truncated the sampler;
* rewards are scalar per completion, at the end; advantages are per sequence;
* a group's samples live on one data-parallel rank; no gradient accumulation beyond
  ``--minibatches``; no learning-rate schedule; fp32 by default.
"""

from .run import COMPARE_TOLERANCE, TrainConfig, train

__all__ = ["TrainConfig", "train", "COMPARE_TOLERANCE"]
