"""The Python half of every cuda launcher, on any machine: rlkernels/cuda/*.py run on CPU
tensors against a recording stand-in for rlkernels._C (the real views and structs, the real
parameter names), so a launcher that would fail before its kernel, or hand a kernel the wrong
view, fails here and not on the first GPU run. Needs the built extension (its classes)."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from rlkernels.cuda import load_extension
from _cuda_gpu import cpu_expect  # noqa: E402

RC = load_extension()
pytestmark = pytest.mark.skipif(RC is None, reason="rlkernels._C not built")


def _params(fn):
    sig = fn.__doc__.splitlines()[0]
    inner = sig[sig.index("(") + 1:sig.rindex(") ->")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inner) if p.strip()]


class _Recorder:
    """rlkernels._C whose launchers record their keyword arguments instead of launching."""

    def __init__(self):
        self.calls = []
        for name in ("Rows", "Matrix", "PolicyTensors", "PolicyParams", "CODES"):
            setattr(self, name, getattr(RC, name))

    def __getattr__(self, name):
        real = getattr(RC, name)

        def launch(*args, **kw):
            assert not args and sorted(kw) == sorted(_params(real)), name
            self.calls.append((name, kw))
        return launch

    def last(self, name):
        return [kw for n, kw in self.calls if n == name][-1]


@pytest.fixture
def rec(monkeypatch):
    from rlkernels.cuda import advantage, policy, sparse, vocab

    r = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    for m in (vocab, sparse, advantage, policy):
        for attr, value in (("extension", lambda: r), ("_extension", lambda: r),
                            ("stream_of", lambda t: 0), ("expect", cpu_expect)):
            if hasattr(m, attr):
                monkeypatch.setattr(m, attr, value)
    monkeypatch.setattr(policy, "_PARAMS", {})
    return r


def test_vocab_and_sparse_launchers(rec):
    from rlkernels.cuda import sparse as cs
    from rlkernels.cuda import vocab as cv

    n, v, k = 5, 37, 4
    x = torch.randn(n, v)
    tok = torch.randint(0, v, (n,))
    _, _, st = cv.token_logprobs_forward(x, tok, 0.5, -100, True)
    kw = rec.last("token_logprobs_forward")
    assert (kw["logits"].stride, kw["tokens"].stride, kw["inv_temperature"]) == (v, 1, 2.0)
    cv.token_logprobs_backward(None, torch.ones(n), x[:, :30], None, st, 1.0, -100,
                               out=x[:, :30])  # a row slice, in place
    kw = rec.last("token_logprobs_backward")
    assert kw["grad_logp"].ptr == 0 and kw["tokens"].ptr == 0
    assert kw["out"].ptr == kw["logits"].ptr == x.data_ptr() and kw["out"].stride == v
    assert (kw["vocab"], kw["stats"].stride0, kw["stats"].stride1) == (30, 3, 1)
    _, sp, sq = cv.kl_divergence_forward(x, x + 1, torch.zeros(n, dtype=torch.bool), "jsd",
                                         0.3, 1.0)
    assert rec.last("kl_divergence_forward")["kind"] == RC.CODES["kl_kind"]["jsd"]
    cv.kl_divergence_backward(torch.ones(n), x, x + 1, None, sp, sq, "forward", 0.5, 1.0, False)
    kw = rec.last("kl_divergence_backward")
    assert kw["grad_ref"].ptr == 0 and kw["ignore_mask"].ptr == 0 and kw["stats_q"].stride0 == 3
    idx = torch.randint(0, v, (n, 2 * k))[:, ::2]  # strided ids
    lp, tail, st2 = cs.sparse_logprobs_forward(x, idx, 1.0, "support", True)
    kw = rec.last("sparse_forward")
    assert kw["mode"] == RC.CODES["sparse_mode"]["support"] and kw["out"].stride == k
    cs.sparse_logprobs_backward(torch.ones(n, k), torch.ones(n), x, idx, lp, tail, st2, 1.0,
                                "support")
    assert rec.last("sparse_backward")["logp"].ptr == lp.data_ptr()
    cs.sparse_kl_forward(x, idx, torch.randn(n, k), 1.0, True)
    assert rec.last("sparse_forward")["mode"] == RC.CODES["sparse_mode"]["kl"]
    cs.sparse_kl_backward(torch.ones(n), x, idx, torch.randn(n, k), tail, st2, 1.0, True)
    kw = rec.last("sparse_backward")
    assert kw["logp"].ptr == 0 and kw["slot_values"].stride0 == k


def test_advantage_and_policy_launchers(rec):
    from rlkernels._policy_options import PolicyOptions
    from rlkernels.cuda import advantage as ca
    from rlkernels.cuda import policy as cp

    r = torch.randn(8)
    ca.group_advantages_forward(r, None, 4, "rloo", 1e-6, True)
    kw = rec.last("group_advantages_forward")
    assert (kw["slots"], kw["group_size"], kw["method"], kw["perm"]) == (2, 4, 2, 0)
    ca.group_advantages_forward(r, torch.tensor([0, 1, 0, 1, 2, 2, 2, 0]), 0, "batch_std",
                                1e-6, True)
    kw = rec.last("group_advantages_forward")
    assert kw["perm"] != 0 and kw["method"] == RC.CODES["advantage_method"]["batch_std"]
    rew, mask = torch.randn(3, 6), torch.rand(3, 6) > 0.3
    ca.gae_forward(rew, rew.double(), mask, 0.99, 0.95)
    assert rec.last("gae_forward")["dtype"] == RC.CODES["dtype"]["float64"]
    ca.discounted_returns_forward(rew.t().contiguous().t(), mask.float(), 0.9)
    kw = rec.last("discounted_returns_forward")
    assert (kw["rewards"].stride0, kw["rewards"].stride1) == (1, 3)
    _, stats = ca.masked_whiten_forward(rew, mask, True, 1e-8, True)
    ca.masked_whiten_backward(torch.ones(3, 6), rew, mask, stats, True, True)
    logp = torch.randn(3, 6)
    o = PolicyOptions(loss="cispo", kl_coef=0.1, kl_estimator="k3+", agg="seq-mean-token-mean",
                      ratio_level="sequence")
    cp.policy_loss_forward(logp, logp, torch.randn(3), mask, None, logp, logp, None, o)
    kw = rec.last("policy_loss_forward")
    pt, pp = kw["tensors"], kw["params"]
    assert (pt.B, pt.T, pt.adv.stride1, pt.is_weights.ptr, kw["normalizer"]) == (3, 6, 0, 0, 0)
    assert (pp.loss, pp.seq, pp.agg, pp.kl_estimator, pp.use_kl, pp.has_w) == (1, 1, 1, 4, 1, 0)
    cp.policy_loss_backward(torch.ones(()), logp, logp, torch.randn(3, 6), mask.float(),
                            torch.tensor(4.0), None, None, logp, PolicyOptions())
    kw = rec.last("policy_loss_backward")
    assert kw["tensors"].adv.stride1 == 1 and kw["normalizer"] != 0 and kw["g_ent"] == 0
    assert kw["params"].has_w == 1 and kw["params"].kl_estimator == 3
