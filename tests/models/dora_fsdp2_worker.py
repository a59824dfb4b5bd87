"""One rank of tests/models/test_meta_build.py's 2-process FSDP2 DoRA check.

`python -m tests.models.dora_fsdp2_worker CONFIG.json OUT_DIR`, started twice with RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR/MASTER_PORT (as torchrun sets them). Each rank builds the config's model with `build_model` under FSDP2
(the meta-device build) and, in the same process, the whole-model load without any sharding (`build_in_full`), both
after the same seed; it writes which of its shards differ from the matching rows of the whole model. Then the
sharded model trains a few steps on real SQuAD rows (each rank its half of every batch) and rank 0 trains the whole
model on the whole batches alone, as a single process would; rank 0 writes both loss curves.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

STEPS = 3
SEED = 7
ROWS, TOKENS = 4, 48  # rows of equal length: the mean of the two ranks' mean losses is the whole batch's mean loss


def batches(model_path: str) -> list[torch.Tensor]:
    """STEPS batches of ROWS real SQuAD rows, each cut to its first TOKENS tokens (none of them padding)."""
    from automodel.data.squad import make_squad_dataset
    from automodel.models import load_tokenizer
    from tests.conftest import SQUAD_DEV

    items = make_squad_dataset(load_tokenizer(model_path), str(SQUAD_DEV), split="validation", seq_length=128,
                               limit_dataset_samples=ROWS * STEPS)
    rows = [torch.tensor(items[i]["input_ids"][:TOKENS]) for i in range(ROWS * STEPS)]
    assert all(len(row) == TOKENS for row in rows)
    return [torch.stack(rows[i:i + ROWS]) for i in range(0, ROWS * STEPS, ROWS)]


def train(model, data: list[torch.Tensor], average=None) -> list[float]:
    """AdamW steps with the causal LM loss of transformers; `average` makes one rank's loss the job's."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    curve = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        curve.append((average(loss.detach()) if average else loss.detach()).item())
    return curve


def shard_mismatches(sharded, whole, rank: int, world: int) -> list[str]:
    """Parameters whose local values differ from the whole model's: FSDP2 holds rows chunk `rank` of `world`."""
    from torch.distributed.tensor import DTensor, Shard

    reference = dict(whole.named_parameters())
    wrong = []
    for name, param in sharded.named_parameters():
        want = reference[name].detach()
        if isinstance(param, DTensor):
            assert param.placements == (Shard(0),), (name, param.placements)
            want, param = want.chunk(world, dim=0)[rank], param.to_local()
        if param.dtype != want.dtype or not torch.equal(param.detach(), want):
            wrong.append(name)
    return wrong


def main(config_file: str, out_dir: str) -> None:
    import logging

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from automodel.distributed.parallel import Parallelism
    from automodel.models.build import build_in_full, build_model, lora_settings, model_section

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.set_num_threads(1)
    cfg = json.loads(Path(config_file).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    parallel = Parallelism.from_config(cfg)
    assert parallel.strategy == "fsdp2" and parallel.dp_size == world == 2, parallel.strategy
    torch.manual_seed(SEED)
    sharded = build_model(cfg, parallel)
    torch.manual_seed(SEED)
    whole = build_in_full(model_section(cfg), lora_settings(cfg), None, torch.device("cpu"))
    magnitudes = [p for n, p in sharded.named_parameters() if ".lora_magnitude_vector." in n]
    result = {"sharded_magnitudes": sum(isinstance(p, DTensor) for p in magnitudes),
              "mismatches": shard_mismatches(sharded, whole, rank, world)}

    data = batches(cfg["model"]["pretrained_model_name_or_path"])
    half = ROWS // world

    def average(loss):
        dist.all_reduce(loss)
        return loss / world

    result["sharded_losses"] = train(sharded, [ids[rank * half:(rank + 1) * half] for ids in data], average)
    if rank == 0:
        result["whole_losses"] = train(whole, data)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
