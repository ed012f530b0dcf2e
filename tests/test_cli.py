"""The command line: ``rlkernels info`` and ``rlkernels verify`` (SPEC section 4)."""

import subprocess
import sys

import pytest
import torch

import rlkernels
from rlkernels import _verify
from rlkernels.cli import main


def test_info_lists_every_backend_with_a_status(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"rlkernels {rlkernels.__version__}" in out
    for name, status in rlkernels.available_backends().items():
        assert f"{name:7} {status}" in out


def test_verify_quick_passes_and_prints_one_row_per_op(capsys):
    assert main(["verify", "--quick", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    for op in ("token_logprobs", "entropy", "sparse_logprobs", "sparse_kl", "kl_divergence",
               "grpo_loss", "policy_loss", "kl_penalty", "group_advantages",
               "linear_token_logprobs"):
        assert op in out
    assert "FAIL" not in out
    assert " 0 failed" in out


def test_verify_exits_1_when_a_backend_is_wrong(monkeypatch, capsys):
    """A backend that returns wrong numbers must fail the table, not pass silently."""
    real = _verify._vocab_cases

    def broken(vocab, n):
        cases = real(vocab, n)
        ok = cases["entropy"]

        def wrong(dtype, backend, ref):
            outs, inputs = ok(dtype, backend, ref)
            return ([o + 1e-3 for o in outs] if not ref else outs), inputs
        cases["entropy"] = wrong
        return cases

    monkeypatch.setattr(_verify, "_vocab_cases", broken)
    assert main(["verify", "--quick", "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    assert "entropy V=7" in out and "FAIL" in out


def test_verify_reports_a_crash_as_a_failed_row():
    def crash(dtype, backend, ref):
        raise RuntimeError("boom")
    row = _verify.check("crash", crash, "torch", torch.float32)
    assert not row.ok and "RuntimeError: boom" in row.note


def test_verify_unavailable_backend_exits_1(capsys):
    status = rlkernels.available_backends()
    missing = [b for b, s in status.items() if s != "ok"]
    if not missing:
        pytest.skip("every backend is available here")
    assert main(["verify", "--backend", missing[0]]) == 1
    assert "not available" in capsys.readouterr().err


def test_train_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--steps", "--ops", "--fused-head", "--model", "--kl-coef"):
        assert flag in out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "rlkernels", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "backends:" in out
