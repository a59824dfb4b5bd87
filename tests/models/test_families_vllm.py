"""Remote-code families against an independent implementation: vLLM's own ChatGLM, InternLM2 and Solar.

scripts/check_families_against_vllm.py writes each family's tiny checkpoint in its published layout (widened to
head dim 32 for vLLM's CPU attention), computes our prompt log-probabilities with trust_remote_code off, and asks
vLLM's CPU build (.venv-vllm, scripts/setup_vllm.sh) for its own on the same folders. ChatGLM and InternLM2 are the
families whose weights we convert (fused, interleaved and regrouped projections), Solar Pro a native module of ours;
the other families' differences, measured by hand with the same script, are in docs/supported_models.md.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

FAMILIES = ["chatglm", "internlm2", "solar"]
LOGPROB_TOL = 1e-4  # fp32 on both sides; a wrong split, order or rotary is off by whole units


def test_converted_and_native_families_match_vllm(tmp_path, vllm_python):
    spec = importlib.util.spec_from_file_location("check_families", REPO_ROOT / "scripts" /
                                                  "check_families_against_vllm.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    diffs = check.compare(tmp_path, FAMILIES, vllm_python)
    assert sorted(diffs) == sorted(FAMILIES)
    assert all(diff < LOGPROB_TOL for diff in diffs.values()), diffs
