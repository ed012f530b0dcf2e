"""The command line: ``rlkernels info``, ``verify`` and the user errors of every command
(SPEC sections 4 and 6)."""

import re
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

    def broken(vocab, n, dev="cpu"):
        cases = real(vocab, n, dev)
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


def test_verify_unavailable_backend_is_a_user_error(capsys):
    status = rlkernels.available_backends()
    missing = [b for b, s in status.items() if s != "ok"]
    if not missing:
        pytest.skip("every backend is available here")
    assert main(["verify", "--backend", missing[0]]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"rlkernels verify: error: --backend: backend {missing[0]!r} is "
                            f"not available: {status[missing[0]]}\n")
    assert captured.out == ""


_NO_TRITON = "triton is installed but no GPU is visible and TRITON_INTERPRET=1 is not set"
_NO_CUDA = "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"


@pytest.fixture
def cpu_only(monkeypatch):
    """Backend statuses of a CPU machine without TRITON_INTERPRET (the tests set it)."""
    from rlkernels import backends
    monkeypatch.setattr(backends, "available_backends",
                        lambda: {"torch": "ok", "triton": _NO_TRITON, "cuda": _NO_CUDA})


def test_verify_says_per_backend_checked_or_skipped(cpu_only, capsys):
    assert main(["verify", "--quick"]) == 0
    out = capsys.readouterr().out
    n = out.count(" torch    float32 ")
    assert n > 10
    assert f"\n  torch   checked: {n} passed (on cpu)\n" in out
    assert (f"\n  triton  skipped: {_NO_TRITON}; rlkernels verify --interpret checks it on CPU "
            "through the Triton interpreter\n") in out
    assert f"\n  cuda    skipped: {_NO_CUDA}\n" in out
    assert out.endswith(f"{n} passed, 0 failed ({out.rsplit('(', 1)[1]}")


def test_verify_interpret_checks_triton_on_cpu(cpu_only, capsys):
    """--interpret really runs the triton kernels (a subprocess under TRITON_INTERPRET=1)."""
    assert main(["verify", "--interpret", "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    n = out.count(" triton   float32 ")
    assert n > 10 and "FAIL" not in out
    assert re.search(rf"\n  triton  checked: {n} passed \(Triton interpreter on CPU, quick "
                     r"shapes\)(; not implemented by triton, checked on torch only: .*)?\n", out)
    assert "token_logprobs V=1031" in out and "grpo_loss V=7" in out


def test_verify_interpret_failure_is_a_failed_row(cpu_only, monkeypatch, capsys):
    def crashed(cmd, **kwargs):
        assert kwargs["env"]["TRITON_INTERPRET"] == "1"
        return subprocess.CompletedProcess(cmd, 1, stdout="",
                                           stderr="Traceback ...\nImportError: boom\n")
    monkeypatch.setattr(subprocess, "run", crashed)
    assert main(["verify", "--interpret", "--backend", "triton"]) == 1
    out = capsys.readouterr().out
    assert "FAIL the interpreter run exited with 1: ImportError: boom" in out
    assert "\n  triton  checked: 0 passed, 1 failed (Triton interpreter on CPU" in out


def test_verify_unavailable_triton_points_to_interpret(cpu_only, capsys):
    assert main(["verify", "--backend", "triton"]) == 2
    assert capsys.readouterr().err == (
        f"rlkernels verify: error: --backend: backend 'triton' is not available: {_NO_TRITON}; "
        "rlkernels verify --interpret checks it on CPU through the Triton interpreter\n")


def test_verify_interpret_with_another_backend_is_a_user_error(capsys):
    assert main(["verify", "--interpret", "--backend", "torch"]) == 2
    assert capsys.readouterr().err == ("rlkernels verify: error: --interpret: checks the "
                                       "triton backend, got --backend torch\n")


def test_info_says_how_the_extension_was_built(monkeypatch, capsys):
    import rlkernels.cuda
    from rlkernels.cuda import _loader
    monkeypatch.setattr(rlkernels.cuda, "extension_info", lambda: {
        "version": "0.1.0", "cuda_runtime": "12.8", "cuda_driver": "0.0",
        "cuda_archs": "80,90a", "nvcc": "12.8.93", "device_count": 0, "path": "/x/_C.so"})
    assert main(["info"]) == 0
    assert ("\n_C        built for sm_80, sm_90a with nvcc 12.8.93, CUDA runtime 12.8 "
            "(/x/_C.so)\n") in capsys.readouterr().out
    monkeypatch.setattr(rlkernels.cuda, "extension_info", lambda: {})
    monkeypatch.setattr(_loader, "_load", lambda: (None, _loader.NOT_BUILT))
    assert main(["info"]) == 0
    assert f"\n_C        not loaded: {_loader.NOT_BUILT}\n" in capsys.readouterr().out


# ---------------------------------------------------------------------- user errors

_CUDA_OFF = rlkernels.available_backends()["cuda"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["train", "--group-size", "0"], "--group-size: expected a positive integer, got 0"),
    (["train", "--hidden-size", "30"],
     "--hidden-size: expected a multiple of 4 (the attention heads), got 30"),
    (["train", "--model", "/no/such/folder"], "--model: expected a local Hugging Face model "
     "folder, got '/no/such/folder' (no such folder)"),
    (["train", "--device", "gpu0"], "--device: expected a torch device such as cpu, cuda or "
     "cuda:1, got 'gpu0'"),
    (["train", "--device", "cpu", "--backend", "cuda"],
     f"--backend: backend 'cuda' is not available: {_CUDA_OFF}" if _CUDA_OFF != "ok" else
     "--backend: backend 'cuda' needs CUDA tensors, got tensors on cpu"),
    (["bench", "--modes", "bwd"], "--modes: expected a comma-separated list of fwd, fwd+bwd, "
     "got 'bwd'"),
    (["bench", "--providers", "nope"], "--providers: unknown ['nope']; expected some of "),
    (["bench", "--budget-s", "0"], "--budget-s: expected a number of seconds > 0, got 0.0"),
])
def test_user_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"rlkernels {argv[0]}: error: {message}")
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert "Traceback" not in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_device_cuda_without_gpu_is_one_line(capsys):
    assert main(["train", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    why = "this torch is a CPU-only build" if not torch.version.cuda else \
        "torch.cuda.is_available() is False"
    assert err == ("rlkernels train: error: --device: expected an available device, got "
                   f"'cuda': no CUDA GPU is usable ({why}); use --device cpu\n")


def test_debug_shows_the_traceback(capsys):
    from rlkernels.cli import UserError
    for argv in (["--debug", "train", "--steps", "0"], ["train", "--steps", "0", "--debug"]):
        with pytest.raises(UserError, match="--steps: expected a positive integer, got 0"):
            main(argv)


def test_user_error_from_the_shell_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "rlkernels", "train", "--steps", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == ("rlkernels train: error: --steps: expected a positive integer, "
                           "got 0\n")


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


def test_verify_runs_gpu_backends_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [_verify.device_for(b) for b in ("torch", "triton", "cuda")] == ["cpu", "cuda",
                                                                             "cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {_verify.device_for(b) for b in ("torch", "triton", "cuda")} == {"cpu"}


def test_verify_cases_put_every_tensor_on_the_device():
    """The meta device stands in for a GPU: a case that left one input on CPU would raise
    the ops' device-mismatch error, and outputs and gradients must land on the device."""
    cases = {**_verify._vocab_cases(7, 8, "meta"), **_verify._other_cases(True, "meta")}
    for name, case in cases.items():
        for ref in (False, True):
            outs, grads = _verify._run(case, torch.float32, "torch", ref)
            assert {t.device.type for t in outs + list(grads)} == {"meta"}, (name, ref)
