"""Streaming training data through the recipe (real GSM8K rows, pretrained stories260K).

- the same rows streamed train exactly like the map-style dataset (per-step losses, epochs);
- ranks get disjoint round-robin shares whose union is the epoch's stream; shuffled epochs differ;
- a preempted streaming run resumes exactly, also on another number of processes (2 -> 1);
- what a stream cannot do (no max_steps, a streaming validation set, workers, too little data) is a one-line error.
"""

from __future__ import annotations

import pytest

from automodel.data.instruction import make_instruction_dataset
from automodel.data.streaming import RankShare
from automodel.errors import UserError
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import ASSETS, STORIES
from tests.distributed_helpers import FAST_LOSS_PATH, automodel_cmd, losses, run, train_records, write_config

GSM8K = ASSETS / "instruct" / "gsm8k_test_1319.jsonl"
GLOBAL_BATCH = 4


def stream_config(tmp_path, streaming: bool, max_steps: int = 5, shuffle: bool = False, samples: int = 20,
                  **step_scheduler) -> dict:
    """Full SFT of stories260K on the first `samples` GSM8K rows (those within seq_length), global batch 4."""
    return {
        "recipe": "llm_finetune",
        "seed": 7,
        "model": {"pretrained_model_name_or_path": str(STORIES), "dtype": "float32"},
        "dataset": {"_target_": "automodel.data.instruction.make_instruction_dataset", "dataset_name": str(GSM8K),
                    "seq_length": 420, "limit_dataset_samples": samples, "streaming": streaming,
                    "cache_dir": str(tmp_path / "hf_cache")},
        "dataloader": {"shuffle": shuffle},
        "step_scheduler": {"global_batch_size": GLOBAL_BATCH, "local_batch_size": 2, "max_steps": max_steps,
                           "log_every_steps": 1, **step_scheduler},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0},
        "lr_scheduler": {"decay": "constant", "warmup_steps": 0},
        "checkpoint": {"checkpoint_dir": str(tmp_path / "ckpt")},
        "logging": {"progress_bar": False, "plot": False},  # the plot: tests/test_monitoring.py
    }


def epochs(ckpt_dir) -> list[int]:
    return [r["epoch"] for r in train_records(ckpt_dir)]


@pytest.fixture(scope="module")
def kept_rows(tmp_path_factory, stories_tokenizer) -> int:
    """How many of the 20 rows fit seq_length (the map-style dataset's length)."""
    folder = tmp_path_factory.mktemp("rows")
    return len(make_instruction_dataset(stories_tokenizer, str(GSM8K), seq_length=420, limit_dataset_samples=20,
                                        cache_dir=str(folder)))


def test_streamed_rows_train_exactly_like_the_map_style_dataset(tmp_path, kept_rows):
    steps_per_epoch = kept_rows // GLOBAL_BATCH
    assert kept_rows % GLOBAL_BATCH and steps_per_epoch >= 2, "an epoch of whole steps, then a partial one to drop"
    max_steps = steps_per_epoch + 2  # into the second epoch
    mapped = FinetuneRecipe(stream_config(tmp_path / "map", streaming=False, max_steps=max_steps)).run()
    streamed = FinetuneRecipe(stream_config(tmp_path / "stream", streaming=True, max_steps=max_steps)).run()
    assert streamed.steps == mapped.steps == max_steps
    assert streamed.train_losses == pytest.approx(mapped.train_losses, rel=1e-6)
    assert epochs(tmp_path / "stream" / "ckpt") == epochs(tmp_path / "map" / "ckpt") == \
        [0] * steps_per_epoch + [1, 1]


def test_ranks_share_the_stream_round_robin_and_shuffled_epochs_differ(tmp_path, stories_tokenizer):
    stream = make_instruction_dataset(stories_tokenizer, str(GSM8K), seq_length=420, limit_dataset_samples=20,
                                      streaming=True, cache_dir=str(tmp_path))

    def share(rank: int, world: int, epoch: int, start: int = 0) -> list[list[int]]:
        dealt = RankShare(stream, rank, world, shuffle=True, seed=3, buffer_size=8)
        dealt.set_position(epoch, start)
        return [row["input_ids"] for row in dealt]

    whole = share(0, 1, epoch=0)
    assert share(0, 1, epoch=0) == whole, "an epoch's order is reproducible"
    assert share(0, 2, epoch=0) == whole[0::2] and share(1, 2, epoch=0) == whole[1::2]
    assert share(1, 2, epoch=0, start=6) == whole[7::2], "a position counts examples of the whole stream"
    other = share(0, 1, epoch=1)
    assert sorted(other) == sorted(whole) and other != whole


@pytest.mark.slow
def test_preempted_stream_resumes_exactly_on_another_number_of_processes(tmp_path, kept_rows):
    """SIGTERM during step 3 of a 2-process shuffled streaming run; resumed in one process, every step's loss
    equals the uninterrupted one-process run's (which crosses an epoch boundary)."""
    max_steps = kept_rows // GLOBAL_BATCH + 2
    straight = FinetuneRecipe(stream_config(tmp_path / "straight", streaming=True, shuffle=True,
                                            max_steps=max_steps)).run()
    cfg = stream_config(tmp_path, streaming=True, shuffle=True, max_steps=max_steps)
    preempt = {**cfg, "loss_fn": {"_target_": "tests.faults.SignalOnCall", "call": 3},  # 1 micro-batch per rank
               "distributed": {"strategy": "ddp"}}
    out = run(automodel_cmd(write_config(tmp_path, preempt), "--nproc-per-node", "2", "--allow-target", "tests.faults"))
    assert "preempted at step 3" in out.stdout
    assert "strategy ddp, data parallel 2" in out.stdout
    assert FAST_LOSS_PATH in out.stdout, "DDP full SFT keeps the fast path"
    out = run(automodel_cmd(write_config(tmp_path, cfg)))
    assert "resuming from" in out.stdout
    assert losses(tmp_path / "ckpt") == pytest.approx(straight.train_losses, rel=1e-5)
    assert epochs(tmp_path / "ckpt") == epochs(tmp_path / "straight" / "ckpt")


@pytest.mark.parametrize("change, message", [
    ({"step_scheduler": {"max_steps": None, "num_epochs": 1}}, "step_scheduler.max_steps: required with a streaming"),
    ({"validation_dataset": "streaming"}, "validation_dataset: streaming is for the training set"),
    ({"dataloader": {"num_workers": 2}}, "dataloader.num_workers: a streaming dataset is read in the training"),
    ({"dataloader": {"group_by_length": True}}, "dataloader.group_by_length: needs every example's length"),
], ids=["no-max-steps", "streaming-validation", "workers", "group-by-length"])
def test_what_a_stream_cannot_do_is_a_clear_error(tmp_path, change, message):
    cfg = stream_config(tmp_path, streaming=True)
    for section, value in change.items():
        cfg[section] = dict(cfg["dataset"]) if value == "streaming" else {**cfg.get(section, {}), **value}
    with pytest.raises(UserError, match=message):
        FinetuneRecipe(cfg).setup()


def test_a_stream_smaller_than_one_global_batch_is_a_clear_error(tmp_path):
    recipe = FinetuneRecipe(stream_config(tmp_path, streaming=True, samples=3))
    recipe.setup()
    with pytest.raises(UserError, match="the stream holds fewer than global_batch_size=4 examples"):
        recipe.train()
