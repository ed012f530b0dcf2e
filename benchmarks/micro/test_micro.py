"""pytest-benchmark microbenchmarks on tiny CPU cases (outside tests/: not in the default run).

    python -m pytest benchmarks/micro -q --benchmark-only
"""

import pytest
import torch

import rlkernels as rk
from rlkernels._bench import providers

pytest.importorskip("pytest_benchmark")

N, V = 256, 4096


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("impl", ["rlkernels-torch", "torch-naive"])
def test_token_logprobs_fwd(benchmark, logits, impl):
    x, t = logits
    fn = ((lambda: rk.token_logprobs(x, t, backend="torch")) if impl == "rlkernels-torch"
          else (lambda: providers.naive_token_logprobs(x, t)))
    benchmark(fn)


@pytest.mark.parametrize("impl", ["rlkernels-torch", "torch-naive"])
def test_token_logprobs_fwd_bwd(benchmark, logits, impl):
    x, t = logits
    x = x.clone().requires_grad_(True)
    f = ((lambda: rk.token_logprobs(x, t, backend="torch")) if impl == "rlkernels-torch"
         else (lambda: providers.naive_token_logprobs(x, t)))
    benchmark(lambda: torch.autograd.grad(f().sum(), x))


@pytest.mark.parametrize("impl", ["rlkernels-torch", "torch-naive"])
def test_policy_loss_fwd(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    lp, old = torch.randn(16, 512, generator=g) - 2, torch.randn(16, 512, generator=g) - 2
    adv, mask = torch.randn(16, generator=g), torch.rand(16, 512, generator=g) < 0.9
    fn = ((lambda: rk.policy_loss(lp, old, adv, mask, backend="torch")[0])
          if impl == "rlkernels-torch" else
          (lambda: providers.naive_policy_loss(lp, old, adv, mask)))
    benchmark(fn)
