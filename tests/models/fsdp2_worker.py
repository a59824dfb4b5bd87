"""One rank of the 2-process FSDP2 group of tests/models/test_fsdp2_architectures.py.

`python -m tests.models.fsdp2_worker RUNS.json`, started twice with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
(as torchrun sets them): the process group is joined once, then every run listed in RUNS.json trains in turn through
`FinetuneRecipe.setup()` + `train()` (the public path; `run()` would also destroy the group after the first run),
and the group is destroyed once at the end. Each run's metrics.jsonl and model/ folder land in its own out_dir;
rank 0 writes `DONE` there when the run finished, or every rank writes `error-rank<N>.txt` and exits.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

from automodel.models.registry import BY_NAME
from tests.models.test_architectures import run_config

STEPS = 3
GLOBAL_BATCH = 2  # one example per rank per step under FSDP2; two micro-batches of one in a single process


def no_dropout(model_dir: Path) -> dict[str, float]:
    """Config overrides that switch off every dropout of the checkpoint (GPTBigCode's default 0.1, Phi-3-Small's
    `*_dropout_prob`): with dropout the two layouts draw different masks, so their losses could not be compared."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {key: 0.0 for key, value in config.items()
            if key.endswith(("pdrop", "dropout", "dropout_prob")) and isinstance(value, float) and value}


def fsdp2_config(architecture: str, model_dir, out_dir, lora: bool) -> dict:
    """The same user-style config for both layouts: 3 steps of global batch 2 on real SQuAD rows, strategy fsdp2
    (one process runs it unsharded), fp32, final consolidated HF `model/` folder."""
    cfg = run_config(BY_NAME[architecture], model_dir, out_dir, lora=lora)
    cfg["model"].update(no_dropout(model_dir))
    cfg["dataset"]["limit_dataset_samples"] = GLOBAL_BATCH * STEPS
    cfg["step_scheduler"].update(global_batch_size=GLOBAL_BATCH, local_batch_size=1, max_steps=STEPS,
                                 ckpt_every_steps=STEPS)
    cfg["distributed"] = {"strategy": "fsdp2"}
    cfg["dist_env"] = {"backend": "gloo", "timeout_minutes": 3}  # a failed peer ends the job in minutes, not 30
    return cfg


def fsdp2_layout(model) -> dict:
    """How apply_fsdp2 split this model into units (automodel/distributed/fsdp2.py), for the test to check."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from automodel.models.decoder_layers import decoder_layers
    from automodel.models.unwrap import transformers_model

    base = transformers_model(model)
    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    in_layers = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    root = [(name, p) for name, p in model.named_parameters() if id(p) not in in_layers]
    return {"tied": head is not None and head.weight is embedding.weight,
            "embedding_trained": embedding.weight.requires_grad,
            "embedding_own_unit": isinstance(embedding, FSDPModule),
            "root_frozen_sharded": [n for n, p in root if not p.requires_grad and isinstance(p, DTensor)],
            "root_frozen_replicated": [n for n, p in root if not p.requires_grad and not isinstance(p, DTensor)],
            "trained_not_sharded": [n for n, p in model.named_parameters()
                                    if p.requires_grad and not isinstance(p, DTensor)]}


def main(runs_file: str) -> None:
    from automodel.training.recipe import FinetuneRecipe

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    recipe = None
    for run in json.loads(Path(runs_file).read_text()):
        out_dir = Path(run["out_dir"])
        try:
            recipe = FinetuneRecipe(fsdp2_config(run["architecture"], run["model_dir"], out_dir, run["lora"]))
            recipe.setup()  # joins the process group
            parallel = recipe.parts.parallel
            assert parallel.strategy == "fsdp2" and parallel.dp_size == 2, parallel.strategy
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"layout-rank{rank}.json").write_text(json.dumps(fsdp2_layout(recipe.parts.model)))
            recipe.train()
        except BaseException:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
            raise
        if rank == 0:
            (out_dir / "DONE").write_text("ok")
    if recipe is not None:
        recipe.parts.parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
