"""SPEC 1 errors: bad shapes, dtypes, values and option strings raise ``ValueError`` /
``TypeError`` naming the argument (``"<argument>: expected ..., got ..."``, the style of
tests/ops/test_vocab_errors.py) before any kernel launch, on every backend.

Each entry is ``(op, label, call(backend), exception type, regex)``; the regex starts with
the argument's name (and, where the message has one, the received value).
"""

from __future__ import annotations

import re

import pytest
import torch
from _cases import DEVICE, RUNNABLE_BACKENDS, implements

import rlkernels as rk

D = DEVICE
X = torch.zeros(2, 3, 7, device=D)                   # logits [B, T, V]
TOK = torch.zeros(2, 3, dtype=torch.long, device=D)
IDX = torch.zeros(2, 3, 4, dtype=torch.long, device=D)
TGT = torch.full((2, 3, 4), -2.0, device=D)
LP = torch.full((2, 3), -1.0, device=D)              # log-probs [B, T]
M = torch.ones(2, 3, dtype=torch.bool, device=D)
A = torch.ones(2, device=D)
R = torch.zeros(6, device=D)                         # rewards [B]
H = torch.zeros(2, 3, 5, device=D)                   # hidden [B, T, H]
W = torch.zeros(7, 5, device=D)                      # lm_head [V, H]

ERRORS = [
    # ------------------------------------------------------------------ token_logprobs
    ("token_logprobs", "temperature=0", lambda b: rk.token_logprobs(
        X, TOK, temperature=0.0, backend=b), ValueError, r"^temperature: .*got 0\.0"),
    ("token_logprobs", "tokens-float", lambda b: rk.token_logprobs(
        X, TOK.float(), backend=b), TypeError, r"^tokens: .*int32, int64.*got float32"),
    ("token_logprobs", "tokens-shape", lambda b: rk.token_logprobs(
        X, TOK[:, :2], backend=b), ValueError, r"^tokens: .*\(2, 3\).*got \(2, 2\)"),
    ("token_logprobs", "logits-int", lambda b: rk.token_logprobs(
        X.long(), TOK, backend=b), TypeError, r"^logits: .*got int64"),
    ("token_logprobs", "ignore_index-float", lambda b: rk.token_logprobs(
        X, TOK, ignore_index=-100.0, backend=b), TypeError, r"^ignore_index: .*got float"),
    # ------------------------------------------------------------------------- entropy
    ("entropy", "temperature-nan", lambda b: rk.entropy(
        X, temperature=float("nan"), backend=b), ValueError, r"^temperature: .*got nan"),
    ("entropy", "V=0", lambda b: rk.entropy(
        X[..., :0], backend=b), ValueError, r"^logits: .*V >= 1.*got shape \(2, 3, 0\)"),
    ("entropy", "logits-list", lambda b: rk.entropy(
        [[0.0, 1.0]], backend=b), TypeError, r"^logits: .*got list"),
    # ----------------------------------------------------------------- sparse_logprobs
    ("sparse_logprobs", "normalize", lambda b: rk.sparse_logprobs(
        X, IDX, normalize="top", backend=b), ValueError, r"^normalize: .*got 'top'"),
    ("sparse_logprobs", "indices-float", lambda b: rk.sparse_logprobs(
        X, IDX.float(), backend=b), TypeError, r"^indices: .*got float32"),
    ("sparse_logprobs", "indices-shape", lambda b: rk.sparse_logprobs(
        X, IDX[:1], backend=b), ValueError, r"^indices: .*got \(1, 3, 4\)"),
    ("sparse_logprobs", "return_tail-int", lambda b: rk.sparse_logprobs(
        X, IDX, return_tail=1, backend=b), TypeError, r"^return_tail: .*got int"),
    # ----------------------------------------------------------------------- sparse_kl
    ("sparse_kl", "target-shape", lambda b: rk.sparse_kl(
        X, IDX, TGT[..., :3], backend=b), ValueError,
     r"^target_logprobs: .*\(2, 3, 4\).*got \(2, 3, 3\)"),
    ("sparse_kl", "tail-int", lambda b: rk.sparse_kl(
        X, IDX, TGT, tail=1, backend=b), TypeError, r"^tail: .*got int"),
    ("sparse_kl", "temperature<0", lambda b: rk.sparse_kl(
        X, IDX, TGT, temperature=-1.0, backend=b), ValueError, r"^temperature: .*got -1\.0"),
    # ------------------------------------------------------------------- kl_divergence
    ("kl_divergence", "kind", lambda b: rk.kl_divergence(
        X, X, kind="reversed", backend=b), ValueError, r"^kind: .*got 'reversed'"),
    ("kl_divergence", "beta>1", lambda b: rk.kl_divergence(
        X, X, kind="jsd", beta=1.5, backend=b), ValueError, r"^beta: .*got 1\.5"),
    ("kl_divergence", "ref-shape", lambda b: rk.kl_divergence(
        X, X[:, :2], backend=b), ValueError, r"^ref_logits: .*got \(2, 2, 7\)"),
    ("kl_divergence", "ignore_mask-float", lambda b: rk.kl_divergence(
        X, X, ignore_mask=LP, backend=b), TypeError, r"^ignore_mask: .*got float32"),
    # ---------------------------------------------------------------- sampling_support
    ("sampling_support", "top_k=0", lambda b: rk.sampling_support(
        X, top_k=0), ValueError, r"^top_k: .*got 0"),
    ("sampling_support", "top_k-float", lambda b: rk.sampling_support(
        X, top_k=2.0), TypeError, r"^top_k: .*got float"),
    ("sampling_support", "top_p>1", lambda b: rk.sampling_support(
        X, top_p=1.5), ValueError, r"^top_p: .*got 1\.5"),
    ("sampling_support", "temperature=0", lambda b: rk.sampling_support(
        X, top_k=2, temperature=0.0), ValueError, r"^temperature: .*got 0\.0"),
    # ---------------------------------------------------------------------- kl_penalty
    ("kl_penalty", "estimator", lambda b: rk.kl_penalty(
        LP, LP, estimator="k4"), ValueError, r"^estimator: .*got 'k4'"),
    ("kl_penalty", "ref-shape", lambda b: rk.kl_penalty(
        LP, LP[:1]), ValueError, r"^ref_logp: .*got \(1, 3\)"),
    ("kl_penalty", "clamp-order", lambda b: rk.kl_penalty(
        LP, LP, clamp=(1.0, -1.0)), ValueError, r"^clamp: .*got \(1\.0, -1\.0\)"),
    # --------------------------------------------------------------------- policy_loss
    ("policy_loss", "loss", lambda b: rk.policy_loss(
        LP, LP, A, M, loss="ppo2", backend=b), ValueError, r"^loss: .*got 'ppo2'"),
    ("policy_loss", "mask-shape", lambda b: rk.policy_loss(
        LP, LP, A, M[:1], backend=b), ValueError, r"^mask: .*got \(1, 3\)"),
    ("policy_loss", "advantages-shape", lambda b: rk.policy_loss(
        LP, LP, R[:3], M, backend=b), ValueError, r"^advantages: .*got \(3,\)"),
    ("policy_loss", "agg", lambda b: rk.policy_loss(
        LP, LP, A, M, agg="mean", backend=b), ValueError, r"^agg: .*got 'mean'"),
    ("policy_loss", "clip_low<0", lambda b: rk.policy_loss(
        LP, LP, A, M, clip_low=-0.1, backend=b), ValueError, r"^clip_low: .*got -0\.1"),
    ("policy_loss", "dual_clip<=1", lambda b: rk.policy_loss(
        LP, LP, A, M, dual_clip=0.5, backend=b), ValueError, r"^dual_clip: .*got 0\.5"),
    # ----------------------------------------------------------------------- grpo_loss
    ("grpo_loss", "tokens-shape", lambda b: rk.grpo_loss(
        X, TOK[:, :2], LP, A, M, backend=b), ValueError, r"^tokens: .*got \(2, 2\)"),
    ("grpo_loss", "old_logp-shape", lambda b: rk.grpo_loss(
        X, TOK, LP[:1], A, M, backend=b), ValueError, r"^old_logp: .*got \(1, 3\)"),
    ("grpo_loss", "unknown-option", lambda b: rk.grpo_loss(
        X, TOK, LP, A, M, clip_ratio=0.2, backend=b), TypeError, r"clip_ratio"),
    ("grpo_loss", "temperature=0", lambda b: rk.grpo_loss(
        X, TOK, LP, A, M, temperature=0.0, backend=b), ValueError, r"^temperature: .*got 0\.0"),
    ("grpo_loss", "kl_estimator", lambda b: rk.grpo_loss(
        X, TOK, LP, A, M, ref_logp=LP, kl_coef=0.1, kl_estimator="k9", backend=b),
     ValueError, r"^kl_estimator: .*got 'k9'"),
    # ---------------------------------------------------------------- group_advantages
    ("group_advantages", "both-groupings", lambda b: rk.group_advantages(
        R, group_size=2, group_index=TOK[0].repeat(2), backend=b), ValueError,
     r"^group_size, group_index: .*got both"),
    ("group_advantages", "neither-grouping", lambda b: rk.group_advantages(
        R, backend=b), ValueError, r"^group_size, group_index: .*got neither"),
    ("group_advantages", "size-not-divisor", lambda b: rk.group_advantages(
        R, group_size=4, backend=b), ValueError, r"^group_size: .*B=6.*got 4"),
    ("group_advantages", "method", lambda b: rk.group_advantages(
        R, group_size=2, method="ppo", backend=b), ValueError, r"^method: .*got 'ppo'"),
    ("group_advantages", "index-shape", lambda b: rk.group_advantages(
        R, group_index=TOK[0], backend=b), ValueError, r"^group_index: .*got \(3,\)"),
    ("group_advantages", "rewards-2d", lambda b: rk.group_advantages(
        LP, group_size=1, backend=b), ValueError, r"^rewards: .*got shape \(2, 3\)"),
    # ------------------------------------------------------------------- masked_whiten
    ("masked_whiten", "mask-shape", lambda b: rk.masked_whiten(
        LP, M[:1], backend=b), ValueError, r"^mask: .*got \(1, 3\)"),
    ("masked_whiten", "eps<0", lambda b: rk.masked_whiten(
        LP, M, eps=-1.0, backend=b), ValueError, r"^eps: .*got -1\.0"),
    ("masked_whiten", "values-int", lambda b: rk.masked_whiten(
        TOK, M, backend=b), TypeError, r"^values: .*got int64"),
    # ----------------------------------------------------------------------------- gae
    ("gae", "gamma>1", lambda b: rk.gae(
        LP, LP, M, gamma=1.5, backend=b), ValueError, r"^gamma: .*got 1\.5"),
    ("gae", "lam<0", lambda b: rk.gae(
        LP, LP, M, lam=-0.1, backend=b), ValueError, r"^lam: .*got -0\.1"),
    ("gae", "values-shape", lambda b: rk.gae(
        LP, LP[:1], M, backend=b), ValueError, r"^values: .*got \(1, 3\)"),
    # -------------------------------------------------------------- discounted_returns
    ("discounted_returns", "mask-shape", lambda b: rk.discounted_returns(
        LP, M[:, :1], backend=b), ValueError, r"^mask: .*got \(2, 1\)"),
    ("discounted_returns", "rewards-1d", lambda b: rk.discounted_returns(
        A, A > 0, backend=b), ValueError, r"^rewards: .*got shape \(2,\)"),
    ("discounted_returns", "gamma<0", lambda b: rk.discounted_returns(
        LP, M, gamma=-0.5, backend=b), ValueError, r"^gamma: .*got -0\.5"),
    # ----------------------------------------------------------- linear_token_logprobs
    ("linear_token_logprobs", "hidden-H", lambda b: rk.linear_token_logprobs(
        H[..., :4], W, TOK, backend=b), ValueError, r"^hidden: .*5.*got shape \(2, 3, 4\)"),
    ("linear_token_logprobs", "bias-shape", lambda b: rk.linear_token_logprobs(
        H, W, TOK, bias=torch.zeros(6, device=D), backend=b), ValueError,
     r"^bias: .*\(7,\).*got \(6,\)"),
    ("linear_token_logprobs", "weight-dtype", lambda b: rk.linear_token_logprobs(
        H, W.double(), TOK, backend=b), TypeError, r"^weight: .*got float64"),
    ("linear_token_logprobs", "head_precision", lambda b: rk.linear_token_logprobs(
        H, W, TOK, head_precision="fp8", backend=b), ValueError,
     r"^head_precision: .*got 'fp8'"),
    ("linear_token_logprobs", "tokens-shape", lambda b: rk.linear_token_logprobs(
        H, W, TOK[:1], backend=b), ValueError, r"^tokens: .*got \(1, 3\)"),
    # ---------------------------------------------------------------- linear_grpo_loss
    ("linear_grpo_loss", "hidden-2d", lambda b: rk.linear_grpo_loss(
        H[0], W, TOK[0], LP[0], A[:1], M[0], backend=b), ValueError,
     r"^hidden: .*got shape \(3, 5\)"),
    ("linear_grpo_loss", "mask-shape", lambda b: rk.linear_grpo_loss(
        H, W, TOK, LP, A, M[:1], backend=b), ValueError, r"^mask: .*got \(1, 3\)"),
    ("linear_grpo_loss", "weight-dtype", lambda b: rk.linear_grpo_loss(
        H, W.half(), TOK, LP, A, M, backend=b), TypeError, r"^weight: .*got float16"),
    # -------------------------------------------------------------- rollout_correction
    ("rollout_correction", "level", lambda b: rk.rollout_correction(
        LP, LP, M, level="seq", backend=b), ValueError, r"^level: .*got 'seq'"),
    ("rollout_correction", "rollout_logp-shape", lambda b: rk.rollout_correction(
        LP, LP[:1], M, backend=b), ValueError, r"^rollout_logp: .*\(2, 3\).*got \(1, 3\)"),
    ("rollout_correction", "reject", lambda b: rk.rollout_correction(
        LP, LP, M, reject="seq_max_k1", reject_threshold=2.0, backend=b), ValueError,
     r"^reject: .*got 'seq_max_k1'"),
    ("rollout_correction", "opsm-advantages", lambda b: rk.rollout_correction(
        LP, LP, M, reject="opsm", reject_threshold=0.1, backend=b), ValueError,
     r"^advantages: .*got None"),
]

# an unknown backend name, for every op that takes backend=
_BACKEND_CALLS = {
    "token_logprobs": lambda b: rk.token_logprobs(X, TOK, backend=b),
    "entropy": lambda b: rk.entropy(X, backend=b),
    "sparse_logprobs": lambda b: rk.sparse_logprobs(X, IDX, backend=b),
    "sparse_kl": lambda b: rk.sparse_kl(X, IDX, TGT, backend=b),
    "kl_divergence": lambda b: rk.kl_divergence(X, X, backend=b),
    "policy_loss": lambda b: rk.policy_loss(LP, LP, A, M, backend=b),
    "grpo_loss": lambda b: rk.grpo_loss(X, TOK, LP, A, M, backend=b),
    "group_advantages": lambda b: rk.group_advantages(R, group_size=2, backend=b),
    "masked_whiten": lambda b: rk.masked_whiten(LP, M, backend=b),
    "gae": lambda b: rk.gae(LP, LP, M, backend=b),
    "discounted_returns": lambda b: rk.discounted_returns(LP, M, backend=b),
    "linear_token_logprobs": lambda b: rk.linear_token_logprobs(H, W, TOK, backend=b),
    "linear_grpo_loss": lambda b: rk.linear_grpo_loss(H, W, TOK, LP, A, M, backend=b),
    "rollout_correction": lambda b: rk.rollout_correction(LP, LP, M, backend=b),
}


def _params():
    out = []
    for op, label, fn, exc, regex in ERRORS:
        for b in RUNNABLE_BACKENDS:
            if implements(b, op):
                out.append(pytest.param(fn, b, exc, regex, id=f"{op}:{label}-{b}"))
    return out


@pytest.mark.parametrize("call, backend, exc, regex", _params())
def test_bad_input_raises_naming_the_argument(call, backend, exc, regex):
    with pytest.raises(exc) as info:
        call(backend)
    assert info.type is exc, f"{info.type.__name__}: {info.value}"  # not a subclass
    assert re.search(regex, str(info.value)), f"message {str(info.value)!r} !~ {regex!r}"


@pytest.mark.parametrize("op", sorted(_BACKEND_CALLS))
def test_unknown_backend_name_raises(op):
    with pytest.raises(ValueError, match=r"^backend: expected one of 'torch', 'triton', "
                                         r"'cuda', 'auto', got 'tpu'"):
        _BACKEND_CALLS[op]("tpu")


@pytest.mark.parametrize("op", sorted(_BACKEND_CALLS))
def test_unavailable_backend_raises_runtime_error(op):
    """SPEC 2: asking explicitly for an unavailable backend raises RuntimeError saying why."""
    missing = [b for b, why in rk.available_backends().items() if why != "ok"]
    if not missing:
        pytest.skip("every backend is available here")
    name = missing[0]
    reason = rk.available_backends()[name]
    with pytest.raises(RuntimeError, match="^" + re.escape(
            f"backend {name!r} is not available: {reason}")):
        _BACKEND_CALLS[op](name)
