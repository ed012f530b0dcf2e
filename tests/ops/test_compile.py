"""The issue's compile contract: one function calling ``token_logprobs`` and ``policy_loss``
traces under ``torch.compile(fullgraph=True)`` without graph breaks, forward and backward,
and matches eager."""

import torch

import rlkernels as rk


def _step(logits, tokens, old_logp, adv, mask, backend):
    logp, ent = rk.token_logprobs(logits, tokens, temperature=0.8, return_entropy=True,
                                  backend=backend)
    loss, metrics = rk.policy_loss(logp, old_logp, adv, mask, clip_high=0.28, entropy=ent,
                                   entropy_coef=0.01, backend=backend)
    return loss, metrics["clipfrac"]


def test_token_logprobs_and_policy_loss_compile_fullgraph(backend):
    torch.manual_seed(0)
    b, t, v = 2, 5, 37
    logits = torch.randn(b, t, v, requires_grad=True)
    tokens = torch.randint(0, v, (b, t))
    tokens[0, -1] = -100
    mask = tokens != -100
    old = rk.token_logprobs(logits.detach(), tokens, temperature=0.8) + 0.1 * torch.randn(b, t)
    adv = torch.tensor([1.0, -1.0])

    def step(*args):
        return _step(*args, backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss_c, clip_c = compiled(logits, tokens, old, adv, mask)
    (grad_c,) = torch.autograd.grad(loss_c, logits)
    loss_e, clip_e = step(logits, tokens, old, adv, mask)
    (grad_e,) = torch.autograd.grad(loss_e, logits)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(clip_c, clip_e)
    torch.testing.assert_close(grad_c, grad_e)
    assert grad_c[0, -1].abs().max() == 0  # the padding position


def test_advantage_ops_compile_fullgraph(backend):
    """``gae``, ``discounted_returns``, ``group_advantages`` and ``masked_whiten`` (forward and
    backward) in one compiled function: no graph breaks, eager results."""
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 9), torch.randn(4, 9, requires_grad=True)
    mask = torch.rand(4, 9) > 0.3

    def step(r, v, m):
        adv, ret = rk.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
        g = rk.discounted_returns(r, m, gamma=0.9, backend=backend)
        ga = rk.group_advantages(r.sum(1), group_size=2, backend=backend)
        return adv, ret, g, ga, rk.masked_whiten(v, m, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    out_c = compiled(rewards, values, mask)
    (grad_c,) = torch.autograd.grad(out_c[-1].square().sum(), values)
    out_e = step(rewards, values, mask)
    (grad_e,) = torch.autograd.grad(out_e[-1].square().sum(), values)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_c, grad_e)


def test_policy_loss_number_normalizer_and_kl_penalty_compile_fullgraph(backend):
    """The eager fast path (ops/_eager.py) and the cached number normalizer stay out of the
    trace: a compiled step with ``normalizer=<number>``, ``kl_penalty`` and a KL term has no
    graph break and matches eager, forward and backward."""
    torch.manual_seed(2)
    logp = -torch.rand(3, 6, requires_grad=True)
    old = logp.detach() + 0.2 * torch.randn(3, 6)
    adv, mask = torch.randn(3), torch.rand(3, 6) > 0.2

    def step(lp, o, a, m):
        loss, metrics = rk.policy_loss(lp, o, a, m, ref_logp=o, kl_coef=0.05,
                                       agg="seq-mean-token-sum", normalizer=3.0,
                                       backend=backend)
        kl = rk.kl_penalty(lp, o, clamp=(-10.0, 10.0))
        return loss + kl.mean(), metrics["kl"]

    torch._dynamo.reset()
    out_c = torch.compile(step, fullgraph=True)(logp, old, adv, mask)
    (grad_c,) = torch.autograd.grad(out_c[0], logp)
    out_e = step(logp, old, adv, mask)
    (grad_e,) = torch.autograd.grad(out_e[0], logp)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad_c, grad_e)
