"""The rows of `FSDP2_VERIFIED` (automodel/models/registry.py) train under 2-process FSDP2 exactly as in one process.

One 2-process group (gloo, two real processes with torchrun's variables; tests/models/fsdp2_worker.py) is started
once for the module and trains every selected (architecture, mode) in turn through `FinetuneRecipe`: 3 steps of
global batch 2 on real SQuAD rows, one example per rank per step, strategy fsdp2 (each decoder layer and the root
sharded), fp32. Each parametrised test runs the same config in this process (two micro-batches of one) and asserts:
- equal per-step losses (rtol 1e-5: only the order of the sums differs);
- the units FSDP2 got (automodel/distributed/fsdp2.py): every trained parameter sharded; a trained input embedding
  that is not the output head's weight in a unit of its own; the root's frozen parameters (LoRA's base embedding,
  head, final norm) replicated, not sharded;
- the consolidated `model/` folder written under FSDP2 (gathered tensor by tensor, or the gathered LoRA
  adapter) holds the same tensor names, shapes and dtypes as the single-process one, values within 1e-5.
Dropout is switched off in both layouts (see fsdp2_worker.no_dropout); MoE routing is deterministic.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automodel.models.registry import BY_NAME, FSDP2_VERIFIED
from automodel.training.recipe import FinetuneRecipe
from tests.distributed_helpers import free_port, losses, start_job
from tests.models.fsdp2_worker import STEPS, fsdp2_config
from tests.models.test_architectures import checkpoint, one_thread  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

RUNS = [(architecture, mode) for architecture, modes in FSDP2_VERIFIED.items() for mode in modes]
LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-5
WORKER_TIMEOUT_S = 600


def run_id(architecture: str, mode: str) -> str:
    return f"{BY_NAME[architecture].test_id}-{mode}"


class TwoProcessGroup:
    """The two worker processes and the out_dir of each run they train."""

    def __init__(self, procs, logs, out_dirs):
        self.procs, self.logs, self.out_dirs = procs, logs, out_dirs
        self.deadline = time.monotonic() + WORKER_TIMEOUT_S

    def result(self, key) -> Path:
        """The run's out_dir once rank 0 marked it done; fails with the workers' errors otherwise."""
        out_dir = self.out_dirs[key]
        while not (out_dir / "DONE").is_file():
            errors = sorted(out_dir.glob("error-rank*.txt"))
            if errors or all(p.poll() is not None for p in self.procs) or time.monotonic() > self.deadline:
                pytest.fail(f"{run_id(*key)} did not finish under FSDP2:\n" +
                            "\n".join(e.read_text() for e in errors) + self.tail())
            time.sleep(0.2)
        return out_dir

    def tail(self) -> str:
        return "".join(f"\n--- rank {rank} ---\n{log.read_text()[-3000:]}" for rank, log in enumerate(self.logs))


def selected_runs(session) -> list[tuple[str, str]]:
    """The runs this pytest session will test (all of them, or those `-k` kept), so the workers train no others."""
    chosen = {(item.callspec.params["architecture"], item.callspec.params["mode"]) for item in session.items
              if getattr(item, "originalname", None) == "test_fsdp2_two_processes_match_one_process"}
    return [key for key in RUNS if key in chosen]


@pytest.fixture(scope="module")
def fsdp2_group(request, tmp_path_factory, checkpoint):  # noqa: F811
    """Writes the tiny checkpoints, starts the 2-process group on the selected runs, tears it down after the
    module."""
    root = tmp_path_factory.mktemp("fsdp2")
    keys = selected_runs(request.session)
    out_dirs = {key: root / run_id(*key) for key in keys}
    runs = [{"architecture": arch, "model_dir": str(checkpoint(BY_NAME[arch])), "out_dir": str(out_dirs[arch, mode]),
             "lora": mode == "lora"} for arch, mode in keys]
    runs_file = root / "runs.json"
    runs_file.write_text(json.dumps(runs))
    port = free_port()
    logs = [root / f"rank{rank}.log" for rank in range(2)]
    command = [sys.executable, "-m", "tests.models.fsdp2_worker", str(runs_file)]
    launches = [(command, dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(port))) for rank in range(2)]
    try:
        procs = start_job(launches, port, WORKER_TIMEOUT_S, stdouts=[log.open("w") for log in logs])
    except AssertionError as err:
        pytest.fail(f"{err}\n{logs[0].read_text()[-3000:]}")
    group = TwoProcessGroup(procs, logs, out_dirs)
    yield group
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], group.tail()


def saved_tensors(out_dir) -> dict[str, torch.Tensor]:
    folder = out_dir / f"step_{STEPS}" / "model"
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("architecture, mode", RUNS, ids=[run_id(*key) for key in RUNS])
def test_fsdp2_two_processes_match_one_process(architecture, mode, fsdp2_group, checkpoint, tmp_path):  # noqa: F811
    single = tmp_path / "single"
    cfg = fsdp2_config(architecture, checkpoint(BY_NAME[architecture]), single, lora=mode == "lora")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    assert recipe.parts.parallel.strategy == "none" and recipe.parts.grad_acc == 2
    recipe.train()

    sharded = fsdp2_group.result((architecture, mode))
    layout = json.loads((sharded / "layout-rank0.json").read_text())
    assert layout["trained_not_sharded"] == [] and layout["root_frozen_sharded"] == []
    assert layout["embedding_own_unit"] == (layout["embedding_trained"] and not layout["tied"])
    if mode == "lora":
        assert layout["root_frozen_replicated"], layout
    want = losses(single)
    assert len(want) == STEPS
    assert losses(sharded) == pytest.approx(want, rel=LOSS_RTOL)

    if BY_NAME[architecture].published_type and mode == "sft":  # a remote-code family: its published config.json
        config = [json.loads((out / f"step_{STEPS}" / "model" / "config.json").read_text())
                  for out in (sharded, single)]
        assert config[0] == config[1] and config[0]["model_type"] == BY_NAME[architecture].published_type

    got_tensors, want_tensors = saved_tensors(sharded), saved_tensors(single)
    assert got_tensors.keys() == want_tensors.keys()
    for name, want_tensor in want_tensors.items():
        assert got_tensors[name].dtype == want_tensor.dtype == torch.float32, name
        torch.testing.assert_close(got_tensors[name], want_tensor, rtol=WEIGHT_TOL, atol=WEIGHT_TOL, msg=name)
