"""The reference GRPO trainer (issue #6): tasks, rollouts, the two RL-math paths, ``--ops
compare`` (passing, and failing on a wrong path), the CLI outputs, and data parallelism (2
gloo ranks make the same update as 1 rank on the concatenated batch)."""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile

import pytest
import torch

pytest.importorskip("transformers")

from rlkernels.cli import main  # noqa: E402
from rlkernels.trainer import TrainConfig, train  # noqa: E402
from rlkernels.trainer import loop, rl_math  # noqa: E402
from rlkernels.trainer.model import build_tiny_model  # noqa: E402
from rlkernels.trainer.tasks import CharTokenizer, char_reward, sample_prompts  # noqa: E402


# ----------------------------------------------------------------------------- tasks

def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = CharTokenizer()
    ids = tok.encode("12+34=")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "12+34="
    # a generated <pad> or <bos> is not "nothing": it must cost reward like any wrong character
    assert char_reward(tok.decode([tok._ids["7"], tok.pad_token_id]), "7") == 0.5
    with pytest.raises(ValueError, match=r"\['A'\].*not in the alphabet"):
        tok.encode("A")


@pytest.mark.parametrize("task", ["addition", "reversal", "counting"])
def test_tasks_give_correct_answers(task):
    for prompt, answer in sample_prompts(task, 50, random.Random(0), digits=2):
        if task == "addition":
            a, b = prompt[:-1].split("+")
            assert int(answer) == int(a) + int(b) and max(len(a), len(b)) <= 2
        elif task == "reversal":
            assert answer == prompt[:-1][::-1]
        else:
            assert answer == str(prompt.split("#")[0].count("a"))
        assert char_reward(answer, answer) == 1.0


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task: expected one of .* got 'sorting'"):
        sample_prompts("sorting", 1, random.Random(0))


@pytest.mark.parametrize("completion,answer,reward", [
    ("95", "95", 1.0), ("96", "95", 0.5), ("9", "95", 0.5), ("9512", "95", 0.5),
    ("", "7", 0.0), ("", "", 0.0)])
def test_char_reward(completion, answer, reward):
    assert char_reward(completion, answer) == reward


def test_completion_mask_stops_after_first_eos():
    c = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert loop.completion_mask(c, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


# ----------------------------------------------------------------------------- one step

def _model_and_batch(seed=0, prompts=4, group=4):
    tok = CharTokenizer()
    torch.manual_seed(seed)
    model = build_tiny_model("qwen2", tok.vocab_size, tok, torch.device("cpu"), 32, 1)
    pairs = sample_prompts("addition", prompts, random.Random(seed), digits=2)
    batch, texts = loop.rollout(model, tok, pairs, group, max_new_tokens=5)
    return model, tok, batch, texts


def test_rollout_shapes_masks_and_rewards():
    model, tok, batch, texts = _model_and_batch()
    B, C = batch.tokens.shape
    assert B == 16 and 1 <= C <= 5 and len(texts) == B
    assert batch.input_ids.shape[1] == batch.attention_mask.shape[1]
    assert torch.equal(batch.attention_mask[:, -C:], batch.mask)
    assert torch.equal(batch.input_ids[:, -C:][batch.mask.bool()], batch.tokens[batch.mask.bool()])
    assert ((batch.rewards >= 0) & (batch.rewards <= 1)).all()


# (agg, adv_method, fused_head, kl_coef, entropy_coef): every aggregation and advantage mode,
# both kernel entry points (logits and hidden states), with and without KL / entropy terms.
CASES = [("token-mean", "grpo", False, 0.05, 0.01),
         ("seq-mean-token-mean", "dr_grpo", True, 0.05, 0.0),
         ("seq-mean-token-sum", "rloo", False, 0.0, 0.02),
         ("seq-mean-token-sum-norm", "batch_std", True, 0.1, 0.01)]


@pytest.mark.parametrize("agg,adv_method,fused_head,kl_coef,entropy_coef", CASES)
def test_torch_and_kernel_math_agree(agg, adv_method, fused_head, kl_coef, entropy_coef):
    model, _, batch, _ = _model_and_batch()
    batch.rewards = torch.linspace(0, 1, batch.rewards.numel())  # non-trivial advantages
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a reference model that differs, so the KL term is not 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opts = rl_math.LossOptions(kl_coef=kl_coef, entropy_coef=entropy_coef, agg=agg,
                               adv_method=adv_method, clip_high=0.28)
    out = {}
    for name in ("torch", "kernels"):
        math = rl_math.make_math(name, fused_head)
        adv = math.advantages(batch.rewards, batch.group_size, opts)
        old, ref_logp = loop.old_and_ref_logprobs(math, model, ref, batch, opts)
        old = old - 0.5 * torch.sin(torch.arange(old.numel()).view_as(old).float())  # ratio != 1
        norm = loop.normalizer(batch.mask, agg, horizon=5)
        model.zero_grad()
        loss, metrics = math.loss(model, batch, adv, old, ref_logp, norm, opts)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[name] = (adv, old, ref_logp, loss.detach(), metrics, grads)
    (adv_t, old_t, ref_t, loss_t, met_t, g_t), (adv_k, old_k, ref_k, loss_k, met_k, g_k) = \
        out["torch"], out["kernels"]
    assert adv_t.abs().max() > 0.1
    torch.testing.assert_close(adv_k, adv_t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(old_k, old_t, atol=1e-5, rtol=1e-5)
    if kl_coef:
        torch.testing.assert_close(ref_k, ref_t, atol=1e-5, rtol=1e-5)
        assert met_t["kl"] > 1e-4
    assert set(met_k) == set(met_t)
    for key in met_t:
        torch.testing.assert_close(met_k[key], met_t[key], atol=1e-5, rtol=1e-5)
    assert 0 < met_t["clipfrac"] < 1
    torch.testing.assert_close(loss_k, loss_t, atol=1e-6, rtol=1e-5)
    assert g_t.abs().max() > 1e-4
    torch.testing.assert_close(g_k, g_t, atol=1e-6, rtol=1e-4)


def test_minibatches_must_fit_the_rollout():
    with pytest.raises(ValueError, match="minibatches: expected 1 to 4 .* got 5"):
        loop.minibatch_indices(4, 5, "cpu")


# ----------------------------------------------------------------------------- train / CLI

def test_cli_train_compare_passes_and_writes_outputs(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--steps", "3", "--ops", "compare", "--kl-coef", "0.05",
                 "--entropy-coef", "0.01", "--ppo-epochs", "2", "--minibatches", "2",
                 "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "compare: PASS" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ("reward", "loss", "kl", "entropy", "clipfrac", "tokens_per_s", "peak_mem_gb",
                "diff_loss", "diff_logp", "diff_grad_norm", "diff_advantages"):
        assert key in records[0], key
    assert records[-1]["kl"] > 0  # the policy moved away from the reference
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the curve is optional (the "train" extra installs matplotlib)
        assert not (out / "curve.png").exists() and "curve: skipped" in text
    else:
        assert (out / "curve.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["ops"] == "compare"


def test_compare_fails_when_the_kernel_path_is_wrong(monkeypatch):
    real = rl_math.KernelMath.loss

    def off_by_one_percent(self, *args, **kwargs):
        loss, metrics = real(self, *args, **kwargs)
        return loss * 1.01, metrics

    monkeypatch.setattr(rl_math.KernelMath, "loss", off_by_one_percent)
    result = train(TrainConfig(steps=2, ops="compare", entropy_coef=0.01, progress=False))
    assert not result["ok"]
    assert main(["train", "--steps", "1", "--ops", "compare", "--entropy-coef", "0.01",
                 "--no-progress", "--out", tempfile.mkdtemp()]) == 1


def test_fused_head_and_torch_paths_train(tmp_path):
    for ops, fused in (("torch", False), ("kernels", True)):
        result = train(TrainConfig(steps=2, ops=ops, fused_head=fused, progress=False,
                                   out=str(tmp_path / ops)))
        assert result["ok"] and len(result["records"]) == 2


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="ops: expected torch, kernels or compare, got 'x'"):
        train(TrainConfig(ops="x"))
    with pytest.raises(ValueError, match="group_size: expected a positive integer, got 0"):
        train(TrainConfig(group_size=0))


# ----------------------------------------------------------------------------- data parallel

def _dp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        params = _one_update(rank, world, dist.group.WORLD)
        if rank == 0:
            torch.save(params, result_file)
    finally:
        dist.destroy_process_group()


def _one_update(rank, world, group):
    """One AdamW step on rank ``rank``'s share (``1/world`` of the groups) of a fixed batch."""
    model, _, batch, _ = _model_and_batch(seed=3, prompts=4, group=4)
    batch.rewards = torch.linspace(0, 1, batch.rewards.numel()) ** 2
    rows = torch.arange(batch.tokens.shape[0]).view(world, -1)[rank]  # whole groups per rank
    opts = rl_math.LossOptions(kl_coef=0.0, entropy_coef=0.01, clip_high=0.28)
    math = rl_math.make_math("kernels")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    local = batch.rows(rows)
    adv = math.advantages(local.rewards, local.group_size, opts)
    old, _ = loop.old_and_ref_logprobs(math, model, None, local, opts)
    old = old - 0.05
    loop.policy_update(math, model, optim, local, adv, old, None, opts, horizon=5,
                       group=group)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_ranks_make_the_update_of_one_rank_on_the_whole_batch():
    import torch.multiprocessing as mp
    single = _one_update(0, 1, None)
    with tempfile.TemporaryDirectory() as d:
        init, res = os.path.join(d, "init"), os.path.join(d, "params.pt")
        mp.start_processes(_dp_worker, args=(2, init, res), nprocs=2, start_method="spawn")
        two = torch.load(res)
    for a, b in zip(single, two):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
    moved = _model_and_batch(seed=3)[0]
    assert max((a - p).abs().max() for a, p in zip(single, moved.parameters())) > 1e-3
