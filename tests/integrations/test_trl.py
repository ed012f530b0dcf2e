"""rlkernels.integrations.trl: patched TRL helpers return the originals' values; a GRPOTrainer
step on a tiny random model gives the same loss and update patched and unpatched."""
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL not installed (pip install rlkernels[integrations])")
import trl.trainer.utils as tu  # noqa: E402

from rlkernels.integrations import trl as rt  # noqa: E402


@pytest.fixture
def patched():
    orig = {n: getattr(tu, n) for n in ("selective_log_softmax", "entropy_from_logits",
                                        "selective_log_softmax_and_entropy",
                                        "_ChunkedLogProbFunction")}
    rt.patch()
    yield orig
    rt.unpatch()
    for n, o in orig.items():
        assert getattr(tu, n) is o


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match(patched, dtype, temperature):
    logits = (torch.randn(3, 6, 41) * 4).to(dtype)
    idx = torch.randint(0, 41, (3, 6))
    topk = torch.randint(0, 41, (3, 6, 5))
    row_mask = torch.rand(3, 6) > 0.3
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=0.07, rtol=0.02)
    for args in [(idx,), (topk,)]:
        got = tu.selective_log_softmax(logits, *args, temperature=temperature)
        want = patched["selective_log_softmax"](logits, *args, temperature=temperature)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    got = tu.selective_log_softmax(logits, idx, row_mask=row_mask)
    assert (got[~row_mask] == 0).all()
    torch.testing.assert_close(got, patched["selective_log_softmax"](logits, idx, row_mask=row_mask), **tol)
    got = tu.entropy_from_logits(logits, chunk_size=4)
    want = patched["entropy_from_logits"](logits)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol)
    gl, ge = tu.selective_log_softmax_and_entropy(logits, idx, temperature=temperature, row_mask=row_mask)
    wl, we = patched["selective_log_softmax_and_entropy"](logits, idx, temperature=temperature, row_mask=row_mask)
    torch.testing.assert_close(gl, wl, **tol)
    torch.testing.assert_close(ge, we, **tol)


@pytest.mark.parametrize("bad", [-100, -1, 41])
@pytest.mark.parametrize("topk", [False, True])
def test_out_of_range_ids_raise_like_trl(patched, bad, topk):
    # TRL gathers every id (no padding id): -100 and -1 raise there, so they must here too,
    # for a (...) index and a (..., K) one (sparse_logprobs' -1 "unused slot" must not leak)
    logits = torch.randn(2, 3, 41)
    idx = torch.randint(0, 41, (2, 3, 4) if topk else (2, 3))
    idx[1, 2] = bad
    with pytest.raises(RuntimeError):
        patched["selective_log_softmax"](logits, idx)
    n_bad = 4 if topk else 1
    msg = rf"index: expected ids in \[0, 41\) .*got {bad} \({n_bad} id\(s\) out of range\)"
    with pytest.raises(ValueError, match=msg):
        tu.selective_log_softmax(logits, idx)
    with pytest.raises(ValueError, match=msg):
        tu.selective_log_softmax(logits, idx, row_mask=torch.ones(idx.shape, dtype=torch.bool))
    if not topk:
        with pytest.raises(ValueError, match=msg):
            tu.selective_log_softmax_and_entropy(logits, idx)


def test_gradients_match(patched):
    logits = torch.randn(2, 5, 33, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 33, (2, 5))
    g1 = torch.autograd.grad((tu.selective_log_softmax(logits, idx).sum()
                              + tu.entropy_from_logits(logits).sum()), logits)[0]
    g2 = torch.autograd.grad((patched["selective_log_softmax"](logits, idx).sum()
                              + patched["entropy_from_logits"](logits).sum()), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_fused_lm_head_matches(patched):
    h = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(29, dtype=torch.float64)
    t = torch.randint(0, 29, (7,))
    outs = ("log_probs", "entropy")
    got = tu._ChunkedLogProbFunction.apply(h, w, b, t, 0.8, 8, None, 1.0, outs)
    want = patched["_ChunkedLogProbFunction"].apply(h, w, b, t, 0.8, 8, None, 1.0, outs)
    for g, x in zip(got[:2], want[:2]):
        torch.testing.assert_close(g.double(), x.double(), atol=1e-5, rtol=1e-5)
    gg = torch.autograd.grad(got[0].sum() + got[1].sum(), (h, w))
    gw = torch.autograd.grad(want[0].sum() + want[1].sum(), (h, w))
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def _head_inputs(bias):
    # V=29 (odd); rows 0-2 peaked (a hidden row aligned with a weight row, scaled up); weight
    # row 11 duplicates row 4, so rows 0-1, whose arg-max is column 4, tie at 11 (is_top1
    # counts the FIRST maximum only)
    torch.manual_seed(0)
    h = torch.randn(9, 16)
    w = torch.randn(29, 16)
    # small integers: h[0] . w[4] is exact in any GEMM, so columns 4 and 11 tie exactly
    w[4] = w[11] = torch.randint(-2, 3, (16,)).float()
    h[0] = h[1] = 2 * w[4]
    h[2] = 8 * w[17]
    t = torch.randint(0, 29, (9,))
    t[0], t[1], t[2] = 4, 11, 17
    b = torch.randn(29) if bias else None
    if bias:
        b[11] = b[4]
    return h, w, b, t


_ALL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (None, 0.5), (3.0, 1.0), (2.5, 0.7),
                                           (0.0, 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lm_head_every_output_and_option(patched, monkeypatch, softcap, scale,
                                               temperature, bias):
    h, w, b, t = _head_inputs(bias)
    ins = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    ref = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    want = patched["_ChunkedLogProbFunction"].apply(*ref, t, temperature, 8, softcap, scale)

    def no_fallback(*a, **k):
        raise AssertionError("the patched head called TRL's kernel")
    monkeypatch.setattr(patched["_ChunkedLogProbFunction"], "apply", no_fallback)
    got = tu._ChunkedLogProbFunction.apply(*ins, t, temperature, 8, softcap, scale)
    assert len(got) == 5
    for name, g, x in zip(("log_probs",) + _ALL, got, want):
        assert g is not None, name
        assert g.dtype == x.dtype and g.shape == x.shape, name
        if name == "is_top1":
            assert torch.equal(g, x), (g, x)
        else:
            torch.testing.assert_close(g, x, atol=1e-5, rtol=1e-5, msg=name)
    assert got[4][0] and not got[4][1]  # the tie at column 11 is not a hit
    g_lp, g_h = torch.randn(9), torch.randn(9)
    params = [x for x in ins if x is not None]
    gg = torch.autograd.grad((got[0] * g_lp).sum() + (got[1] * g_h).sum(), params)
    gw = torch.autograd.grad((want[0] * g_lp).sum() + (want[1] * g_h).sum(),
                             [x for x in ref if x is not None])
    for name, a, c in zip(("hidden", "weight", "bias"), gg, gw):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (2.5, 0.7)])
def test_fused_lm_head_triton_backend(patched, softcap, scale):
    # the same parity with rlkernels' Triton kernels (the interpreter on CPU)
    import rlkernels
    if rlkernels.available_backends()["triton"] != "ok":
        pytest.skip("triton backend unavailable")
    h, w, b, t = _head_inputs(True)
    ins = [x.clone().requires_grad_() for x in (h, w, b)]
    ref = [x.clone().requires_grad_() for x in (h, w, b)]
    want = patched["_ChunkedLogProbFunction"].apply(*ref, t, 0.7, 8, softcap, scale)
    rlkernels.set_backend("triton")
    got = tu._ChunkedLogProbFunction.apply(*ins, t, 0.7, 8, softcap, scale)
    assert got[4][0] and not got[4][1]
    for name, g, x in zip(("log_probs",) + _ALL, got, want):
        if name == "is_top1":
            assert torch.equal(g, x), (g, x)
        else:
            torch.testing.assert_close(g, x, atol=1e-5, rtol=1e-5, msg=name)
    g_lp, g_h = torch.randn(9), torch.randn(9)
    gg = torch.autograd.grad((got[0] * g_lp).sum() + (got[1] * g_h).sum(), ins)
    gw = torch.autograd.grad((want[0] * g_lp).sum() + (want[1] * g_h).sum(), ref)
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"),
                                     ("log_probs", "entropy", "mean_logits"),
                                     ("log_probs", "entropy", "is_top1"), ("log_sum_sq_probs",)])
def test_fused_lm_head_outputs_subsets(patched, outputs):
    h, w, b, t = _head_inputs(True)
    hg = h.clone().requires_grad_()
    got = tu._ChunkedLogProbFunction.apply(hg, w, b, t, 1.0, 8, None, 1.0, outputs)
    want = patched["_ChunkedLogProbFunction"].apply(h, w, b, t, 1.0, 8, None, 1.0, outputs)
    for g, x in zip(got, want):
        assert (g is None) == (x is None)
        if x is not None:
            assert g.dtype == x.dtype
            torch.testing.assert_close(g.float(), x.float(), atol=1e-5, rtol=1e-5)
    # only the log-probs reach the graph when entropy is not asked for
    got[0].sum().backward()
    assert hg.grad is not None


def test_fused_lm_head_default_outputs_are_trls(patched):
    # TRL's default `outputs` is every output: the stand-in must not default to log_probs only
    h, w, b, t = _head_inputs(False)
    got = tu._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096)
    want = patched["_ChunkedLogProbFunction"].apply(h, w, None, t, 1.0, 4096)
    assert all(x is not None for x in want)
    for g, x in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g.float(), x.float(), atol=1e-5, rtol=1e-5)


def test_patch_covers_late_imports_and_restores():
    import importlib
    import sys
    orig = tu.selective_log_softmax
    rt.patch()
    rt.patch()  # idempotent
    try:
        assert tu.selective_log_softmax is rt.selective_log_softmax
        sys.modules.pop("trl.experimental.a2po.a2po_trainer", None)
        try:
            late = importlib.import_module("trl.experimental.a2po.a2po_trainer")
        except Exception:  # optional deps of an experimental trainer
            late = None
        if late is not None:
            assert late.selective_log_softmax is rt.selective_log_softmax
    finally:
        rt.unpatch()
    assert tu.selective_log_softmax is orig
    if late is not None:
        assert late.selective_log_softmax is orig
    assert not rt.is_patched()


def _grpo_step(tmp_path, patch):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, pad_token_id=0, eos_token_id=1))
    path = str(tmp_path / "tiny")
    model.save_pretrained(path)  # a path, so the reference model (beta > 0) loads offline
    tok.save_pretrained(path)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=4, max_steps=1, report_to=[],
                      use_cpu=True, seed=0, logging_steps=1, save_strategy="no",
                      # plain SGD at lr 1: the update is the (clipped) gradient itself, so
                      # the parameters after the step compare the gradients to 1e-5. Adam's
                      # first step, lr g / (|g| + eps), turns a 1e-12 difference in a
                      # gradient element near 0 into a 1e-5 one (seen on one CPU)
                      optim="sgd", learning_rate=1.0, beta=0.04,
                      # transformers turns on CPU bf16 autocast by default; under it both TRL's
                      # head and the patched one project in bf16 (as they should), and bf16
                      # rounding (~1e-3) would hide any real difference
                      bf16=False,
                      model_init_kwargs={"dtype": torch.float64})  # fp64: the on-policy loss is a difference of equal terms, fp32 rounding would dominate
    reward = lambda completions, **kw: [float(len(c)) + (i % 3) for i, c in enumerate(completions)]  # noqa: E731
    if patch:
        rt.patch()
    try:
        calls = []
        cls = tu._ChunkedLogProbFunction
        orig_apply = cls.apply
        def spy(*a):
            calls.append(1)
            return orig_apply(*a)
        tu._ChunkedLogProbFunction = type("Spy", (), {"apply": staticmethod(spy)})
        tr = GRPOTrainer(model=path, reward_funcs=reward, args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["abc", "xyz"]}),
                         processing_class=tok)
        tr.train()
        tu._ChunkedLogProbFunction = cls
    finally:
        if patch:
            rt.unpatch()
    assert calls, "GRPOTrainer did not go through the fused LM head"
    return tr.state.log_history[0], [p.detach().clone() for p in tr.model.parameters()]


def test_grpo_trainer_step(tmp_path):
    pytest.importorskip("datasets")
    log0, p0 = _grpo_step(tmp_path / "a", patch=False)
    log1, p1 = _grpo_step(tmp_path / "b", patch=True)
    for key in ("loss", "entropy", "kl", "reward"):
        assert log1[key] == pytest.approx(log0[key], abs=1e-5, rel=1e-5), key


def test_grpo_trainer_step_update(tmp_path):
    pytest.importorskip("datasets")
    log0, p0 = _grpo_step(tmp_path / "a", patch=False)
    log1, p1 = _grpo_step(tmp_path / "b", patch=True)
    assert log1["grad_norm"] == pytest.approx(log0["grad_norm"], abs=1e-5, rel=1e-5)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
