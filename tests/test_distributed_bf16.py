"""The bf16 precisions across processes and restarts (gloo on CPU, stories260K on SQuAD), as tests/test_distributed.py
checks fp32: 2-process FSDP2 in bf16 against one process in bf16, and a preempted bf16 run resumed bit for bit.

Tolerance, derived: the two layouts run the same micro-batches (2 rows each), so each row's bf16 forward is the same
computation; they differ in (1) the order gradients are summed (FSDP2 reduces in float32 over 2 ranks, one process
accumulates 4 micro-batches into float32 gradients), and (2) under bf16-mixed, where FSDP2 gathers the float32
master weights cast to bf16 (norm weights and the residual stream in bf16) while one process autocasts only the
matmuls (norms and residual stream stay float32). (1) moves an update by float32 rounding, which can tip a weight's
bf16 copy by one bf16 step (relative 2^-8) and every later loss by about that; (2) is a bf16 rounding of every norm
weight and residual add: a relative error of the order of bf16's unit roundoff 2^-8 = 0.4% per layer, 5 layers deep
for stories260K, which adds up like a random walk to about sqrt(5) x 0.4% = 0.9%. So the per-step losses must agree
within rtol 2^-8 under bf16-frozen (where only (1) applies) and within rtol 2^-6 (1.6%: twice the random walk)
under bf16-mixed. One process resumed in the same precision must repeat the uninterrupted run exactly.
"""

from __future__ import annotations

import pytest

from automodel.config.precision import native_bf16
from automodel.training.recipe import FinetuneRecipe
from tests.distributed_helpers import automodel_cmd, dist_config, losses, run, write_config
from tests.test_distributed import _preempt_at_step

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not native_bf16(__import__("torch").device("cpu"))[0],
                                                   reason="this CPU has no native bf16")]

RTOL = {"bf16-frozen": 2 ** -8, "bf16-mixed": 2 ** -6}


def bf16_config(tmp_path, peft: bool, **distributed) -> dict:
    cfg = dist_config(tmp_path, peft=peft, **distributed)
    del cfg["model"]["dtype"]  # the default precision: bf16 on this CPU
    cfg["precision"] = "bf16"
    return cfg


@pytest.mark.parametrize("peft", [True, False], ids=["lora-bf16-frozen", "sft-bf16-mixed"])
def test_fsdp2_in_bf16_matches_one_process_in_bf16(tmp_path, peft):
    reference = FinetuneRecipe(bf16_config(tmp_path / "one", peft=peft))
    result = reference.run()
    name = reference.parts.parallel.precision.name
    assert name == ("bf16-frozen" if peft else "bf16-mixed")
    out = run(automodel_cmd(write_config(tmp_path, bf16_config(tmp_path, peft=peft, strategy="fsdp2")),
                            "--nproc-per-node", "2"))
    assert f"precision   {name}:" in out.stdout
    got = losses(tmp_path / "ckpt")
    assert len(got) == 3
    assert got == pytest.approx(result.train_losses, rel=RTOL[name])


def test_a_preempted_bf16_run_resumes_bit_for_bit(tmp_path):
    cfg = bf16_config(tmp_path, peft=False)
    uninterrupted = FinetuneRecipe(bf16_config(tmp_path / "whole", peft=False)).run().train_losses
    micro = cfg["step_scheduler"]["global_batch_size"] // cfg["step_scheduler"]["local_batch_size"]
    out = run(automodel_cmd(write_config(tmp_path, _preempt_at_step(cfg, 2, micro)), "--allow-target", "tests.faults"))
    assert "preempted at step 2" in out.stdout
    out = run(automodel_cmd(write_config(tmp_path, cfg)))
    assert "resuming from" in out.stdout and "precision   bf16-mixed:" in out.stdout
    assert losses(tmp_path / "ckpt") == uninterrupted
