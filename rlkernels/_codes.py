"""The integer codes of the string options, one table per option, shared by every compiled
backend: the Triton kernels take them as ``tl.constexpr`` and branch on them (``if KL == 3``),
the CUDA kernels as ``int`` (the enums of csrc/rlkernels.h, exported by
rlkernels._C as ``_C.CODES``; tests/cuda/test_codes.py checks that both sides agree).

A code is what the kernel branches on, not the option's position in a list: aliases share
a code (``"low_var_kl"`` is verl's name for ``"k3"``), and ``"k3+"`` has a code of its own
because the kernels that also compute a gradient must tell it apart from ``"k3"`` (the value
of k3, the gradient of k2). Kernels that compute a value only (no gradient) may treat codes
3 and 4 alike; none of them may map ``"k3+"`` to 3.
"""

from __future__ import annotations

from typing import Dict

# Storage dtype of the tensors a CUDA kernel reads (csrc/rlkernels.h rlk::DType), by torch name.
DTYPES: Dict[str, int] = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}

# kl_divergence(kind=...).
KL_KINDS: Dict[str, int] = {"reverse": 0, "forward": 1, "jsd": 2, "alpha": 3, "tv": 4}

# sparse_logprobs(normalize="full" | "support") and sparse_kl ("kl"): one kernel, three modes.
SPARSE_MODES: Dict[str, int] = {"full": 0, "support": 1, "kl": 2}

# policy_loss / grpo_loss options (rlkernels/_policy_options.py lists the accepted names).
# "luspo" is ppo's per-token term (its own default aggregation only): an alias of "ppo".
POLICY_LOSSES: Dict[str, int] = {"ppo": 0, "cispo": 1, "reinforce": 2, "sapo": 3, "gmpo": 4,
                                 "clip_cov": 5, "kl_cov": 6, "dppo_tv": 7, "dppo_kl": 8,
                                 "dro": 9, "vespo": 10, "luspo": 0}
RATIO_LEVELS: Dict[str, int] = {"token": 0, "sequence": 1}
AGGS: Dict[str, int] = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2,
                        "seq-mean-token-sum-norm": 3}
# "k3_is" / "k3_is_sg": r * k3 (policy_loss only), r differentiable / detached.
KL_ESTIMATORS: Dict[str, int] = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "low_var_kl": 3,
                                 "k3+": 4, "k3_is": 5, "k3_is_sg": 6}

# group_advantages(method=...); verl's "*_vectorized" estimators are the same math.
ADVANTAGE_METHODS: Dict[str, int] = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch_std": 3,
                                     "opo": 4, "gpg": 5, "grpo_passk": 6,
                                     "reinforce_plus_plus_baseline": 7, "gdpo": 8,
                                     "grpo_vectorized": 0, "rloo_vectorized": 2}

# rollout_correction(level=..., mode=..., reject=...) (rlkernels/ops/rollout.py). A reject
# code is a bit position: the kernels take the set of criteria as a bit mask (sum of
# 1 << code), one pair of runtime bounds per criterion. "opsm" is DeepSeek-V3.2's off-policy
# sequence masking; the others are verl's rollout_rs options.
ROLLOUT_LEVELS: Dict[str, int] = {"token": 0, "sequence": 1, "geometric": 2}
ROLLOUT_MODES: Dict[str, int] = {"truncate": 0, "mask": 1}
ROLLOUT_REJECTS: Dict[str, int] = {
    "token_k1": 0, "token_k2": 1, "token_k3": 2,
    "seq_sum_k1": 3, "seq_sum_k2": 4, "seq_sum_k3": 5,
    "seq_mean_k1": 6, "seq_mean_k2": 7, "seq_mean_k3": 8,
    "seq_max_k2": 9, "seq_max_k3": 10, "opsm": 11}

# Names that share another name's code (not exported by the C++ side).
ALIASES: Dict[str, str] = {"low_var_kl": "k3", "luspo": "ppo", "grpo_vectorized": "grpo",
                           "rloo_vectorized": "rloo"}

# Every table, by the name rlkernels._C.CODES uses for it.
TABLES: Dict[str, Dict[str, int]] = {
    "dtype": DTYPES,
    "kl_kind": KL_KINDS,
    "sparse_mode": SPARSE_MODES,
    "policy_loss": POLICY_LOSSES,
    "ratio_level": RATIO_LEVELS,
    "agg": AGGS,
    "kl_estimator": KL_ESTIMATORS,
    "advantage_method": ADVANTAGE_METHODS,
    "rollout_level": ROLLOUT_LEVELS,
    "rollout_mode": ROLLOUT_MODES,
    "rollout_reject": ROLLOUT_REJECTS,
}

__all__ = ["ADVANTAGE_METHODS", "AGGS", "ALIASES", "DTYPES", "KL_ESTIMATORS", "KL_KINDS",
           "POLICY_LOSSES", "RATIO_LEVELS", "ROLLOUT_LEVELS", "ROLLOUT_MODES",
           "ROLLOUT_REJECTS", "SPARSE_MODES", "TABLES"]
