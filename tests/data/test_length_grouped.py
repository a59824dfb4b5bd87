"""Length-grouped sampler: every index once per epoch, similar lengths per batch, exact resume, per-rank shards."""

import pytest
import torch

from automodel.batch import pad_collate
from automodel.data.length_grouped import LengthGroupedSampler, build_train_sampler
from automodel.errors import UserError


def make_dataset(count=203, seed=0):
    lengths = torch.randint(5, 400, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths], lengths


def sampler(dataset, lengths, batch=4, replicas=1, rank=0, epoch=0, factor=50, shuffle=True):
    s = LengthGroupedSampler(dataset, lengths, batch, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=7,
                             drop_last=True, megabatch_factor=factor)
    s.set_epoch(epoch)
    return s


def test_every_index_exactly_once_per_epoch_and_epochs_differ():
    dataset, lengths = make_dataset(count=200)
    first, second = list(sampler(dataset, lengths)), list(sampler(dataset, lengths, epoch=1))
    assert sorted(first) == list(range(200)) and sorted(second) == list(range(200))
    assert first != second


def test_batches_have_less_padding_than_a_plain_shuffle():
    dataset, lengths = make_dataset()

    def padding(order):
        batches = [order[i:i + 4] for i in range(0, len(order) - 3, 4)]
        return sum(pad_collate([dataset[i] for i in b], 0)["input_ids"].numel() for b in batches) - \
            sum(lengths[i] for b in batches for i in b)

    plain = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(7)).tolist()
    assert padding(list(sampler(dataset, lengths, factor=10))) < padding(plain) / 5


def test_resume_skips_exactly_the_yielded_samples():
    dataset, lengths = make_dataset()
    full = list(sampler(dataset, lengths, epoch=3))
    resumed = sampler(dataset, lengths, epoch=3)
    resumed.load_state_dict({"yielded": 37})
    assert list(resumed) == full[37:]
    assert resumed.state_dict() == {"yielded": len(full)}


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_partition_the_epoch_and_step_together(replicas):
    """Groups are global batches: each rank's micro-batch at a step holds similar lengths, and the examples of a step
    are the single-process run's (so N processes train like one)."""
    dataset, lengths = make_dataset(count=240)
    shards = [list(sampler(dataset, lengths, batch=4 * replicas, replicas=replicas, rank=r)) for r in range(replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(240))
    assert len({len(shard) for shard in shards}) == 1
    # The micro-batches of one step come from one global group: their lengths are close across ranks.
    for step in range(len(shards[0]) // 4):
        batch_lengths = [lengths[i] for shard in shards for i in shard[step * 4:(step + 1) * 4]]
        assert max(batch_lengths) - min(batch_lengths) < 150
    single = list(sampler(dataset, lengths, batch=4 * replicas))
    for step in range(len(shards[0]) // 4):
        global_batch = {i for shard in shards for i in shard[step * 4:(step + 1) * 4]}
        assert global_batch == set(single[step * 4 * replicas:(step + 1) * 4 * replicas])


def test_unshuffled_order_is_deterministic_and_complete():
    dataset, lengths = make_dataset(count=100)
    order = list(sampler(dataset, lengths, shuffle=False))
    assert order == list(sampler(dataset, lengths, shuffle=False, epoch=5))
    assert sorted(order) == list(range(100))


def test_build_train_sampler_option_and_errors():
    dataset, _ = make_dataset(count=40)
    node = {"group_by_length": False, "num_workers": 0}
    plain = build_train_sampler(dataset, node, 4, 1, 0, True, 1, default_group_by_length=True)
    assert not isinstance(plain, LengthGroupedSampler) and node == {"num_workers": 0}
    assert isinstance(build_train_sampler(dataset, {}, 4, 1, 0, True, 1, True), LengthGroupedSampler)
    with pytest.raises(UserError, match="dataloader.group_by_length"):
        build_train_sampler(dataset, {"group_by_length": "yes"}, 4, 1, 0, True, 1, True)
    with pytest.raises(UserError, match="dataloader.megabatch_factor"):
        build_train_sampler(dataset, {"megabatch_factor": 0}, 4, 1, 0, True, 1, True)
