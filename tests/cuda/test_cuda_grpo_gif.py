"""``grpo_loss(..., grad_in_forward=True)`` on the cuda backend (csrc/grpo.cu, launchers in
rlkernels/cuda/grpo.py).

Without a GPU (always run): the launcher's Python half against a recording stand-in of
rlkernels._C: which cases reach the one-read kernel and which fall back to the three-pass
composition (``None``), the keyword names it passes (checked against the ``py::arg`` names
of csrc/bindings.cpp, so a renamed argument fails here and not on the first GPU run), and the
per-token aggregation weights it forms on the host side.

On a GPU (``@pytest.mark.gpu``): parity of the one-read kernel with the default path on the
realistic row (V = 151936, bf16: a 2-CTA cluster; fp32: 4 CTAs) and on small odd shapes that
fall back, peaked rows, ``-inf`` columns, padding, masked tokens, upstream scalars 1 / 0.37 /
0 / negative, in place, and the NaN overwrite between forward and backward.
"""

from __future__ import annotations

import contextlib
import re
import types
from pathlib import Path

import pytest
import torch

from rlkernels._policy_options import PolicyOptions
from rlkernels.cuda import grpo as G
from rlkernels.cuda import policy as P

ROOT = Path(__file__).resolve().parents[2]


def _binding_args(name: str):
    """The ``py::arg`` names of ``m.def("<name>", ...)`` in csrc/bindings.cpp."""
    text = (ROOT / "csrc" / "bindings.cpp").read_text()
    start = text.index(f'm.def("{name}"')
    end = text.index(";", start)
    return re.findall(r'py::arg\("(\w+)"\)', text[start:end])


class _FakeC:
    """rlkernels._C with the grpo launchers recording their keyword arguments."""

    def __init__(self, plan=2, has_kernels=True):
        self.calls = []
        self._plan = plan
        self.Rows = lambda ptr=0, stride=0: ("Rows", ptr, stride)
        self.Matrix = lambda ptr=0, s0=0, s1=0: ("Matrix", ptr, s0, s1)
        self.PolicyTensors = lambda **kw: types.SimpleNamespace(**kw)
        self.PolicyParams = types.SimpleNamespace
        if not has_kernels:
            return

        def record(name):
            def launch(*args, **kw):
                assert not args and list(kw) == _binding_args(name), (name, list(kw))
                self.calls.append((name, kw))
                return self._plan if name == "grpo_gif_plan" else None
            return launch

        for name in ("grpo_gif_plan", "grpo_gif_forward", "grpo_gif_scale"):
            setattr(self, name, record(name))


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        c = _FakeC(**kw)
        monkeypatch.setattr(G, "extension", lambda: c)
        monkeypatch.setattr(P, "_extension", lambda: c)
        monkeypatch.setattr(G, "expect", lambda name, t, *a, **k: t)
        monkeypatch.setattr(G, "stream_of", lambda t: 0)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(P, "policy_loss_forward",
                            lambda *a: (torch.zeros(()), torch.zeros(9)))
        P._PARAMS.clear()
        G._PLANS.clear()
        return c
    yield install
    P._PARAMS.clear()
    G._PLANS.clear()


def _args(B=2, T=3, V=64, dtype=torch.bfloat16, **opts):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B * T, V, generator=g).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return (logits, tokens, old, adv, mask, None, None, None, 0.8,
            PolicyOptions.from_kwargs(**opts))


def test_launcher_calls_the_one_read_kernel(fake):
    c = fake()
    out = G.grpo_loss_gif_forward(*_args(), None)
    assert out is not None and len(out) == 6
    names = [n for n, _ in c.calls]
    assert names == ["grpo_gif_plan", "grpo_gif_forward"]
    kw = c.calls[1][1]
    assert kw["cluster"] == 2 and kw["n"] == 6 and kw["vocab"] == 64
    assert kw["ignore_index"] == -100 and kw["inv_temperature"] == pytest.approx(1 / 0.8)
    assert kw["tensors"].B == 2 and kw["tensors"].T == 3
    grad = out[5]
    assert grad.shape == (6, 64) and grad.dtype == torch.bfloat16
    assert kw["out"][1] == grad.data_ptr()


def test_launcher_in_place_writes_into_the_logits(fake):
    c = fake()
    args = _args()
    out = G.grpo_loss_gif_forward(*args, args[0])
    assert out[5] is args[0] and c.calls[1][1]["out"][1] == args[0].data_ptr()


@pytest.mark.parametrize("why, kw, args_kw", [
    ("sequence-level ratio", dict(), dict(ratio_level="sequence")),
    ("a row of 7 bf16 values is not a multiple of 16 bytes", dict(), dict(V=7)),
    ("the plan says no (sm_80, or too long)", dict(plan=0), dict()),
    ("an extension without the kernel", dict(has_kernels=False), dict()),
])
def test_launcher_falls_back(fake, why, kw, args_kw):
    c = fake(**kw)
    V = args_kw.pop("V", 64)
    assert G.grpo_loss_gif_forward(*_args(V=V, **args_kw), None) is None, why
    assert not [n for n, _ in c.calls if n == "grpo_gif_forward"]


@pytest.mark.parametrize("loss, estimator", [("sapo", "k3"), ("ppo", "k3_is")])
def test_launcher_falls_back_without_a_per_token_formula(fake, loss, estimator):
    """A loss or KL estimator that csrc/grpo.cu does not implement (added to policy.cu
    later) goes to the three-pass composition."""
    import dataclasses

    c = fake()
    args = list(_args())
    args[6] = torch.zeros(2, 3)  # ref_logp
    o = types.SimpleNamespace(**dataclasses.asdict(args[9]))
    o.loss, o.kl_estimator, o.kl_coef = loss, estimator, 0.1
    args[9] = o
    assert G.grpo_loss_gif_forward(*args, None) is None
    assert not c.calls


def test_launcher_falls_back_on_a_misaligned_row(fake):
    fake()
    args = list(_args(V=72))
    args[0] = args[0][:, 8:]  # 64 columns starting 16 bytes in: aligned, stride 72 * 2 = 144
    assert G.grpo_loss_gif_forward(*args, None) is not None
    args[0] = torch.randn(6, 65).to(torch.bfloat16)[:, 1:]  # start 2 bytes in
    assert G.grpo_loss_gif_forward(*args, None) is None


def test_scale_launcher(fake):
    c = fake()
    grad = torch.randn(6, 64).to(torch.bfloat16)
    G.grpo_loss_gif_scale_(grad, torch.tensor(0.5))
    (name, kw), = c.calls
    assert name == "grpo_gif_scale" and kw["n"] == 6 and kw["vocab"] == 64
    assert kw["grad"][1] == grad.data_ptr() and kw["dtype"] == 2
    # a column-strided buffer, or an extension without the kernel: the reference, in place
    fake(has_kernels=False)
    buf = torch.ones(4, 3).t()
    G.grpo_loss_gif_scale_(buf, torch.tensor(-2.0))
    assert (buf == -2.0).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("norm", [None, 7.0])
def test_token_weights_are_the_policy_gradient_factor(agg, norm):
    """The weight of each token equals d loss / d L_t of the torch reference's aggregation
    (reinforce with advantage -1 and logp-only loss: d loss / d logp_t is the weight)."""
    from rlkernels.reference.policy import policy_loss_backward

    g = torch.Generator().manual_seed(1)
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[2] = False  # an empty sequence
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    normalizer = None if norm is None else torch.tensor(norm, dtype=torch.float64)
    o = PolicyOptions.from_kwargs(loss="reinforce", agg=agg)
    g_lp, _ = policy_loss_backward(torch.ones((), dtype=torch.float64), logp, logp,
                                   -torch.ones(3, dtype=torch.float64), mask, normalizer,
                                   None, None, None, o)
    w = G.token_weights(mask, normalizer, agg, torch.float64)
    torch.testing.assert_close(w, g_lp, atol=1e-15, rtol=1e-14)


# ================================================================================ on a GPU

def _gpu_case(V, dtype, seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 1] = -100
    logits[1, 2, tokens[1, 2]] += 30.0          # peaked on the token
    logits[1, 3, 11] += 30.0                    # peaked elsewhere
    logits[2, 0, (tokens[2, 0] + 1) % V] = float("-inf")
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, 0] = True
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    cuda = lambda t: t.cuda()  # noqa: E731
    return (cuda(logits.to(dtype)), cuda(tokens), cuda(old), cuda(adv), cuda(mask),
            cuda(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("V, dtype", [(151936, torch.bfloat16), (151936, torch.float32),
                                      (50257, torch.bfloat16), (37, torch.float32)])
@pytest.mark.parametrize("case", [dict(), dict(loss="cispo", clip_high=0.28),
                                  dict(loss="reinforce", agg="seq-mean-token-sum"),
                                  dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0),
                                  dict(ratio_level="sequence", entropy_coef=0.01)])
def test_gpu_gif_matches_default(V, dtype, case):
    import _policy_naive as naive
    import rlkernels as rk

    x0, tok, old, adv, mask, ref = _gpu_case(V, dtype)
    kw = dict(case, ref_logp=ref, temperature=0.9)
    for scale in (1.0, 0.37, 0.0, -1.5):
        grads, losses = [], []
        for gif in (False, True):
            x = x0.clone().requires_grad_(True)
            loss, _ = rk.grpo_loss(x, tok, old, adv, mask, backend="cuda",
                                   grad_in_forward=gif, **kw)
            if gif:
                x.data.fill_(float("nan"))  # the backward must not read the logits
            (g,) = torch.autograd.grad(loss * scale, x)
            grads.append(g)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        naive.grad_bound(grads[1], grads[0])
        assert (grads[1][tok == -100] == 0).all()


@pytest.mark.gpu
def test_gpu_gif_in_place_and_plan():
    import _policy_naive as naive
    import rlkernels as rk
    from rlkernels.cuda import load_extension

    C = load_extension()
    major = torch.cuda.get_device_capability()[0]
    plan = C.grpo_gif_plan(vocab=151936, dtype=2)  # bf16
    assert plan == (2 if major >= 9 else 0)
    x0, tok, old, adv, mask, ref = _gpu_case(151936, torch.bfloat16, seed=3)
    x = x0.clone().requires_grad_(True)
    loss, _ = rk.grpo_loss(x, tok, old, adv, mask, backend="cuda")
    (g_ref,) = torch.autograd.grad(loss * 0.5, x)
    leaf = x0.clone().requires_grad_(True)
    y = leaf * 1.0
    loss, _ = rk.grpo_loss(y, tok, old, adv, mask, backend="cuda", grad_in_forward=True,
                           inplace_backward=True)
    (loss * 0.5).backward()
    naive.grad_bound(leaf.grad, g_ref)
