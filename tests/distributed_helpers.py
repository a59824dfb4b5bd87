"""Tiny real runs for the multi-process tests: config, launching, reading results."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from automodel.batch import pad_collate
from automodel.data.squad import make_squad_dataset
from tests.conftest import REPO_ROOT, SQUAD_DEV
from tests.helpers import tiny_squad_config

LAUNCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE")


# The loss path when every optimisation runs (automodel/training/loss.py), and the start banner's row showing it.
FAST = "logits at label positions only, chunked output head (1024 label tokens a chunk), last layer on label rows"
FAST_LOSS_PATH = f"  loss        {FAST}\n"


def dist_config(tmp_path, peft: bool, max_steps: int = 3, **distributed) -> dict:
    """3 steps of global batch 8 (2 x 2 micro-batches per rank on 2 ranks, 4 x 2 in one process), seq_length 128."""
    cfg = tiny_squad_config(tmp_path, peft=peft, max_steps=max_steps, train_samples=32, global_batch=8, local_batch=2)
    cfg["dataset"]["seq_length"] = cfg["validation_dataset"]["seq_length"] = 128
    cfg["validation_dataset"]["limit_dataset_samples"] = 7  # odd: the second rank's sampler pads one row
    cfg["step_scheduler"].update(log_every_steps=1, val_every_steps=None)
    if distributed:
        cfg["distributed"] = distributed
    return cfg


def write_config(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (pytest itself may run under one)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_VARS and not k.startswith("SLURM_")}
    env.setdefault("PYTHONPATH", str(REPO_ROOT))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def automodel_cmd(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "automodel", "finetune", "llm", "-c", config, *args]


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=clean_env(**env), timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def start_job(launches: list[tuple[list[str], dict[str, str]]], port: int, timeout: float,
              stdouts: list | None = None) -> list[subprocess.Popen]:
    """Start every (command, extra environment) as the processes of one job whose first process hosts the rendezvous
    store on `port`; the others start once that port listens. A store client started first keeps connecting to the
    port, and while it is still free the connection can land on whatever else took it meanwhile (CI once saw it
    reach another test's gloo listener and break that test). `stdouts`: each process's stdout (default: a pipe)."""
    procs = []
    try:
        for rank, (cmd, env) in enumerate(launches):
            stdout = subprocess.PIPE if stdouts is None else stdouts[rank]
            procs.append(subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                                          env=clean_env(**env)))
            if rank == 0:
                wait_until_listening(port, procs[0], timeout)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    return procs


def run_together(launches: list[tuple[list[str], dict[str, str]]], port: int, timeout: float = 300) -> list[str]:
    """`start_job`, then wait for all of its processes and return their outputs (stdout and stderr together).
    Each must exit 0."""
    procs = start_job(launches, port, timeout)
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs
    return outputs


def free_port() -> int:
    """A port nothing uses, below the kernel's ephemeral range when there is room: the kernel never hands those
    out by itself (to a gloo listener or a client socket), so only another explicit choice could take it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(max(1024, low - 8000), low), 64) if low - 1024 >= 1000 else []
    for port in [*candidates, 0]:  # 0: the kernel picks, when the range leaves no room below it
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError("no free port")


def listening_ports() -> set[int]:
    """Local ports of the TCP sockets in LISTEN state (state 0A in /proc/net/tcp and tcp6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            _, local, _, state = line.split()[:4]
            if state == "0A":
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while port not in listening_ports():
        if proc.poll() is not None or time.monotonic() > deadline:
            exited = proc.poll() is not None
            output = proc.stdout.read() if exited and proc.stdout else ""
            raise AssertionError(f"the rendezvous host never listened on port {port} "
                                 f"({f'exit code {proc.returncode}' if exited else 'timed out'}):\n{output}")
        time.sleep(0.1)


def train_records(ckpt_dir) -> list[dict]:
    lines = (ckpt_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def losses(ckpt_dir) -> list[float]:
    return [r["loss"] for r in train_records(ckpt_dir)]


def val_losses(ckpt_dir) -> list[float]:
    lines = (ckpt_dir / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if r["kind"] == "validation"]


def eval_batch(tokenizer) -> dict[str, torch.Tensor]:
    items = make_squad_dataset(tokenizer, str(SQUAD_DEV), split="validation", seq_length=128, limit_dataset_samples=4)
    return pad_collate([items[i] for i in range(4)], tokenizer.pad_token_id)


def logits_of(model_dir, base_path, batch) -> torch.Tensor:
    """Logits of a saved `model/` folder: a PEFT adapter on `base_path`, or a full transformers model."""
    from transformers import AutoModelForCausalLM

    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
