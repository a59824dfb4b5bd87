"""Real multi-process runs (gloo on CPU, stories260K on SQuAD): every layout trains exactly like one process.

Each 2-process run takes the same 3 steps of global batch 8 as a single-process reference run and must match it:
per-step training loss within rtol 1e-5 (fp32; only the order of the sums differs), and the saved `model/`
folder, loaded by peft / transformers, gives logits within 1e-4 of the reference's saved model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from automodel.training.recipe import FinetuneRecipe
from tests.conftest import STORIES
from tests.distributed_helpers import (FAST, FAST_LOSS_PATH, automodel_cmd, clean_env, dist_config, eval_batch,
                                       free_port, logits_of, losses, run, run_together, train_records, val_losses,
                                       write_config)

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
LOGITS_ATOL = 1e-4
# Every wrapping (none, DDP, FSDP2, TP; each with and without LoRA) must keep the fast loss path (FAST_LOSS_PATH):
# DDP full SFT is asserted in tests/test_streaming.py's two-process run, TP with LoRA in the killed-worker run below.


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs, one per peft mode, done once for the whole module."""
    done = {}

    def get(peft: bool) -> Path:
        if peft not in done:
            folder = tmp_path_factory.mktemp("lora" if peft else "sft")
            recipe = FinetuneRecipe(dist_config(folder, peft=peft))
            recipe.run()
            assert recipe.parts.forward_loss.describe() == FAST, "no wrapping: the fast path"
            done[peft] = folder / "ckpt"
        return done[peft]

    return get


def assert_same_training(ckpt: Path, ref: Path, stories_tokenizer) -> None:
    assert losses(ckpt) == pytest.approx(losses(ref), rel=LOSS_RTOL)
    assert len(losses(ckpt)) == 3
    assert val_losses(ckpt) == pytest.approx(val_losses(ref), rel=LOSS_RTOL)
    assert (ckpt / "LATEST").read_text().strip() == "step_3"
    batch = eval_batch(stories_tokenizer)
    got, want = (logits_of(c / "step_3" / "model", STORIES, batch) for c in (ckpt, ref))
    assert (got - want).abs().max() < LOGITS_ATOL


def test_fsdp2_lora_two_processes_through_the_launcher(tmp_path, reference, stories_tokenizer):
    out = run(automodel_cmd(write_config(tmp_path, dist_config(tmp_path, peft=True)), "--nproc-per-node", "2"))
    assert "strategy fsdp2, data parallel 2 x tensor parallel 1" in out.stdout
    assert "world size 2, strategy fsdp2, data parallel 2 x tensor parallel 1, device cpu" in out.stdout
    assert FAST_LOSS_PATH in out.stdout
    assert out.stdout.count("step 3/3 | loss") == 1, "only rank 0 prints"
    model_dir = tmp_path / "ckpt" / "step_3" / "model"
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["adapter_model.safetensors"]
    records = train_records(tmp_path / "ckpt")
    assert [r["label_tokens"] for r in records] == [r["label_tokens"] for r in train_records(reference(True))]
    assert_same_training(tmp_path / "ckpt", reference(True), stories_tokenizer)


def test_fsdp2_sft_started_by_torchrun_directly(tmp_path, reference, stories_tokenizer):
    """Under torchrun the launcher flag is ignored: still 2 workers, not 2 x 2. The `model/` folder is written from
    the shards tensor by tensor, here in the hub's sharded layout (4 files and an index)."""
    cfg = dist_config(tmp_path, peft=False, strategy="fsdp2")
    cfg["checkpoint"]["max_shard_size"] = "300KB"
    config = write_config(tmp_path, cfg)
    out = run([*automodel_cmd(config, "--nproc-per-node", "2")[:1], "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "automodel", *automodel_cmd(config, "--nproc-per-node", "2")[3:]])
    assert "2 processes (torchrun, gloo backend): strategy fsdp2" in out.stdout
    assert FAST_LOSS_PATH in out.stdout
    assert "launching" not in out.stdout
    index = json.loads((tmp_path / "ckpt" / "step_3" / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    assert_same_training(tmp_path / "ckpt", reference(False), stories_tokenizer)


def test_tensor_parallel_two_ranks_started_by_srun_variables(tmp_path, reference, stories_tokenizer):
    """TP=2 (Llama's own transformers plan) in two plain processes that read SLURM's variables, as under srun."""
    config = write_config(tmp_path, dist_config(tmp_path, peft=False, tp_size=2))
    port = free_port()
    outputs = run_together([(automodel_cmd(config), dict(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                                                         SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1",
                                                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                             for rank in range(2)], port=port)
    assert "2 processes (slurm, gloo backend): strategy none, data parallel 1 x tensor parallel 2" in outputs[0]
    assert FAST_LOSS_PATH in outputs[0]
    assert_same_training(tmp_path / "ckpt", reference(False), stories_tokenizer)


def test_ddp_lora_on_two_nodes_of_one_machine(tmp_path, reference, stories_tokenizer):
    """Two launchers (--nnodes 2, one worker each) meet at 127.0.0.1 and train DDP with LoRA."""
    config = write_config(tmp_path, dist_config(tmp_path, peft=True, strategy="ddp"))
    port = free_port()
    outputs = run_together([(automodel_cmd(config, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                                           "--master-addr", "127.0.0.1", "--master-port", str(port)), {})
                            for node in range(2)], port=port)
    assert "strategy ddp, data parallel 2 x tensor parallel 1" in outputs[0]
    assert FAST_LOSS_PATH in outputs[0], "DDP must not hide the peft model's logits_to_keep"
    assert_same_training(tmp_path / "ckpt", reference(True), stories_tokenizer)


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the launcher's worker processes, read from /proc."""
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def test_killed_worker_ends_the_job_naming_the_rank(tmp_path):
    """Tensor parallel with LoRA (2 TP peers); the banner printed before the kill shows its loss path."""
    cfg = dist_config(tmp_path, peft=True, max_steps=10_000, tp_size=2)
    metrics = tmp_path / "ckpt" / "metrics.jsonl"
    launcher = subprocess.Popen(automodel_cmd(write_config(tmp_path, cfg), "--nproc-per-node", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()):  # wait until training is under way
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.5)
        os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "strategy none, data parallel 1 x tensor parallel 2" in stdout
    assert FAST_LOSS_PATH in stdout, "TP + LoRA keeps the fast path"
    assert launcher.returncode == 1
    assert time.monotonic() - killed_at < 120
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker rank 1 (local rank 1") and "killed by signal SIGKILL" in last, stderr[-2000:]
    assert not (tmp_path / "ckpt" / "LATEST").exists()


def _preempt_at_step(cfg: dict, step: int, micro_batches_per_step: int) -> dict:
    """SIGTERM arrives during `step` (the fault loss signals its own process on that micro-batch)."""
    cfg = {**cfg, "loss_fn": {"_target_": "tests.faults.SignalOnCall", "call": (step - 1) * micro_batches_per_step + 1}}
    cfg["checkpoint"] = {**cfg["checkpoint"], "save_consolidated": "every"}
    return cfg


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_fsdp2_resume_with_another_number_of_processes(tmp_path, reference, first, then):
    """Preempted after step 2 with `first` processes, resumed with `then`: DCP reshards model and optimizer, the
    data position carries over, and every step's loss equals the uninterrupted single-process run's."""
    cfg = dist_config(tmp_path, peft=False, strategy="fsdp2")
    micro = cfg["step_scheduler"]["global_batch_size"] // (cfg["step_scheduler"]["local_batch_size"] * first)
    launches = {1: [], 2: ["--nproc-per-node", "2"]}
    out = run(automodel_cmd(write_config(tmp_path, _preempt_at_step(cfg, 2, micro)), *launches[first],
                            "--allow-target", "tests.faults"))  # the fault loss: allowed by the person, not the file
    assert "preempted at step 2" in out.stdout
    assert (tmp_path / "ckpt" / "LATEST").read_text().strip() == "step_2"
    out = run(automodel_cmd(write_config(tmp_path, cfg), *launches[then]))
    assert "resuming from" in out.stdout
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(reference(False)), rel=LOSS_RTOL)
