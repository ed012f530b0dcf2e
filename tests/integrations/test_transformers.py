"""patch_model on tiny random Qwen2 and Llama: log-probs (and gradients) equal
log_softmax(model(...).logits) gathered at the shifted labels."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed")
from rlkernels.integrations.transformers import patch_model, unpatch_model  # noqa: E402


def _model(kind):
    torch.manual_seed(0)
    kw = dict(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).double()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).double()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_logprobs_match(kind):
    model = _model(kind)
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    ref_logits = model(input_ids=ids).logits[:, :-1]
    ref = torch.gather(ref_logits.log_softmax(-1), -1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    ref = ref.masked_fill(labels[:, 1:] == -100, 0)
    g_ref = torch.autograd.grad(ref.sum(), list(model.parameters()), allow_unused=True)
    original = type(model).forward
    patch_model(model)
    out = model(input_ids=ids, labels=labels, return_logprobs=True, return_entropy=True)
    assert out.logits is None
    torch.testing.assert_close(out.logprobs.double(), ref, atol=1e-5, rtol=1e-5)
    z = ref_logits
    h = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    h = h.masked_fill(labels[:, 1:] == -100, 0)  # rlkernels: every output is 0 at padding
    torch.testing.assert_close(out.entropy.double(), h, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(out.logprobs.sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # without the flag: the original forward
    assert model(input_ids=ids).logits is not None
    unpatch_model(model)
    assert "forward" not in vars(model) and model.forward.__func__ is original
