"""The option codes (rlkernels/_codes.py) are declared once and mean the same thing in every
backend: the Python tables are complete and consistent, the backends use them (not copies),
and the C++ side (csrc/rlkernels.h, exported as rlkernels._C.CODES) has the same numbers.
Runs on any machine; the comparison with the built extension needs rlkernels._C."""

from __future__ import annotations

import importlib
import os
import re

import pytest

from rlkernels import _codes
from rlkernels import _policy_options as po
from rlkernels.cuda import load_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# C++ enumerator of csrc/rlkernels.h -> (table, name) of rlkernels/_codes.py.
CPP_NAMES = {
    "kFloat32": ("dtype", "float32"), "kFloat16": ("dtype", "float16"),
    "kBFloat16": ("dtype", "bfloat16"), "kFloat64": ("dtype", "float64"),
    "kReverse": ("kl_kind", "reverse"), "kForward": ("kl_kind", "forward"),
    "kJsd": ("kl_kind", "jsd"), "kAlpha": ("kl_kind", "alpha"), "kTv": ("kl_kind", "tv"),
    "kSparseFull": ("sparse_mode", "full"), "kSparseSupport": ("sparse_mode", "support"),
    "kSparseKl": ("sparse_mode", "kl"),
    "kPpo": ("policy_loss", "ppo"), "kCispo": ("policy_loss", "cispo"),
    "kReinforce": ("policy_loss", "reinforce"), "kSapo": ("policy_loss", "sapo"),
    "kGmpo": ("policy_loss", "gmpo"), "kClipCov": ("policy_loss", "clip_cov"),
    "kKlCov": ("policy_loss", "kl_cov"), "kDppoTv": ("policy_loss", "dppo_tv"),
    "kDppoKl": ("policy_loss", "dppo_kl"), "kDro": ("policy_loss", "dro"),
    "kVespo": ("policy_loss", "vespo"),
    "kTokenLevel": ("ratio_level", "token"), "kSequenceLevel": ("ratio_level", "sequence"),
    "kTokenMean": ("agg", "token-mean"), "kSeqMeanTokenMean": ("agg", "seq-mean-token-mean"),
    "kSeqMeanTokenSum": ("agg", "seq-mean-token-sum"),
    "kSeqMeanTokenSumNorm": ("agg", "seq-mean-token-sum-norm"),
    "kKlK1": ("kl_estimator", "k1"), "kKlAbs": ("kl_estimator", "abs"),
    "kKlK2": ("kl_estimator", "k2"), "kKlK3": ("kl_estimator", "k3"),
    "kKlK3Plus": ("kl_estimator", "k3+"), "kKlK3Is": ("kl_estimator", "k3_is"),
    "kKlK3IsSg": ("kl_estimator", "k3_is_sg"),
    "kGrpo": ("advantage_method", "grpo"), "kDrGrpo": ("advantage_method", "dr_grpo"),
    "kRloo": ("advantage_method", "rloo"), "kBatchStd": ("advantage_method", "batch_std"),
    "kOpo": ("advantage_method", "opo"), "kGpg": ("advantage_method", "gpg"),
    "kGrpoPassk": ("advantage_method", "grpo_passk"),
    "kRppBaseline": ("advantage_method", "reinforce_plus_plus_baseline"),
    "kGdpo": ("advantage_method", "gdpo"),
    "kRolloutToken": ("rollout_level", "token"),
    "kRolloutSequence": ("rollout_level", "sequence"),
    "kRolloutGeometric": ("rollout_level", "geometric"),
    "kRolloutTruncate": ("rollout_mode", "truncate"), "kRolloutMask": ("rollout_mode", "mask"),
    **{"kReject" + "".join(p.capitalize() for p in name.split("_")): ("rollout_reject", name)
       for name in ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2",
                    "seq_sum_k3", "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2",
                    "seq_max_k3", "opsm")},
}


def _canonical(table):
    """The table without its aliases: what the C++ side declares."""
    return {k: v for k, v in table.items() if k not in _codes.ALIASES}


def _header_enums():
    """{enumerator: value} of every enum in csrc/rlkernels.h (explicit values only)."""
    with open(os.path.join(ROOT, "csrc", "rlkernels.h")) as f:
        text = f.read()
    out = {}
    for body in re.findall(r"enum\s+(?:class\s+)?\w+\s*:\s*int\s*\{([^}]*)\}", text):
        for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", body):
            assert name not in out, f"{name} declared twice in rlkernels.h"
            out[name] = int(value)
    return out


def test_tables_are_consistent():
    for name, table in _codes.TABLES.items():
        canon = _canonical(table)
        # distinct codes 0..n-1 for the canonical names
        assert sorted(canon.values()) == list(range(len(canon))), name
    for alias, target in _codes.ALIASES.items():
        homes = [t for t in _codes.TABLES.values() if alias in t]
        assert len(homes) == 1 and homes[0][alias] == homes[0][target], alias


def test_tables_cover_the_accepted_options():
    assert set(_codes.POLICY_LOSSES) == set(po.LOSSES)
    assert set(_codes.RATIO_LEVELS) == set(po.RATIO_LEVELS)
    assert set(_codes.AGGS) == set(po.AGGS)
    assert set(_codes.KL_ESTIMATORS) == set(po.KL_ESTIMATORS)
    # k3+ is not k3: the kernels that compute a gradient tell them apart
    assert _codes.KL_ESTIMATORS["k3+"] != _codes.KL_ESTIMATORS["k3"]
    assert _codes.KL_ESTIMATORS["low_var_kl"] == _codes.KL_ESTIMATORS["k3"]


def test_header_declares_the_same_codes():
    enums = _header_enums()
    assert set(enums) == set(CPP_NAMES), set(enums) ^ set(CPP_NAMES)
    for cpp, (table, name) in CPP_NAMES.items():
        assert _codes.TABLES[table][name] == enums[cpp], (cpp, table, name)
    covered = {(t, n) for t, n in CPP_NAMES.values()}
    for table, entries in _codes.TABLES.items():
        for name in _canonical(entries):
            assert (table, name) in covered, (table, name)


@pytest.mark.skipif(load_extension() is None, reason="rlkernels._C not built")
def test_extension_exports_the_same_codes():
    C = load_extension()
    assert set(C.CODES) == set(_codes.TABLES)
    for name, table in _codes.TABLES.items():
        assert dict(C.CODES[name]) == _canonical(table), name


def test_cuda_launchers_use_the_shared_tables():
    import torch

    from rlkernels.cuda import _common, advantage, policy, sparse, vocab

    assert _common.DTYPE_CODES == {getattr(torch, k): v for k, v in _codes.DTYPES.items()}
    assert policy._LOSSES is _codes.POLICY_LOSSES
    assert policy._AGGS is _codes.AGGS
    assert policy._KLS is _codes.KL_ESTIMATORS
    assert vocab._KINDS is _codes.KL_KINDS
    assert advantage._METHODS is _codes.ADVANTAGE_METHODS
    assert {**sparse._MODES, "kl": sparse._MODE_KL} == _codes.SPARSE_MODES


def test_rollout_backends_use_the_shared_tables():
    from rlkernels.cuda import rollout as crol
    from rlkernels.ops import rollout as orol

    assert crol._LEVELS is _codes.ROLLOUT_LEVELS and crol._MODES is _codes.ROLLOUT_MODES
    assert crol._REJECTS is _codes.ROLLOUT_REJECTS
    assert orol.LEVELS == tuple(_codes.ROLLOUT_LEVELS)
    assert orol.MODES == tuple(_codes.ROLLOUT_MODES)
    assert orol.REJECTS == tuple(_codes.ROLLOUT_REJECTS)
    pytest.importorskip("triton")
    trol = importlib.import_module("rlkernels.triton.rollout")
    assert trol._LEVELS is _codes.ROLLOUT_LEVELS and trol._MODES is _codes.ROLLOUT_MODES
    assert trol._REJECTS is _codes.ROLLOUT_REJECTS


def test_triton_kernels_use_the_same_codes():
    pytest.importorskip("triton")
    tpol = importlib.import_module("rlkernels.triton.policy")
    tadv = importlib.import_module("rlkernels.triton.advantage")
    tvoc = importlib.import_module("rlkernels.triton.vocab")
    tsp = importlib.import_module("rlkernels.triton.sparse")
    assert tpol._LOSSES is _codes.POLICY_LOSSES
    assert tpol._AGGS is _codes.AGGS
    assert tpol._KLS is _codes.KL_ESTIMATORS
    assert tadv._METHODS is _codes.ADVANTAGE_METHODS
    # triton/vocab.py and triton/sparse.py keep their own names for these codes (for now):
    # whatever they are called, their values are the shared table's
    if hasattr(tvoc, "_KINDS"):
        assert dict(tvoc._KINDS) == _codes.KL_KINDS
    for mode in ("full", "support", "kl"):
        name = f"_MODE_{mode.upper()}"
        if hasattr(tsp, name):
            assert getattr(tsp, name) == _codes.SPARSE_MODES[mode], name
