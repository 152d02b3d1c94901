import pytest

from kdistill.engine.batches import BatchPlan
from kdistill.errors import ConfigError


def test_every_record_once_per_epoch_and_deterministic():
    plan = BatchPlan(10, 4, 1, 1, 0, seed=3)
    stream = [i for step in range(5) for i in plan.global_indices(step)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream == [i for step in range(5) for i in BatchPlan(10, 4, 1, 1, 0, seed=3).global_indices(step)]
    assert stream != [i for step in range(5) for i in BatchPlan(10, 4, 1, 1, 0, seed=4).global_indices(step)]


def test_processes_and_micro_batches_partition_the_global_batch():
    whole = BatchPlan(100, 8, 1, 1, 0, seed=0).global_indices(7)
    parts = [BatchPlan(100, 8, 2, 2, rank, seed=0).micro_batches(7) for rank in (0, 1)]
    assert all(len(m) == 2 for p in parts for m in p)
    assert sorted(i for p in parts for m in p for i in m) == sorted(whole)


def test_batch_must_divide():
    with pytest.raises(ConfigError, match="divisible"):
        BatchPlan(100, 6, 4, 1, 0, seed=0)


def test_grouping_by_length_reduces_padding_but_keeps_epochs():
    lengths = [(i * 37) % 101 for i in range(400)]
    plain = BatchPlan(400, 8, 1, 1, 0, seed=0)
    grouped = BatchPlan(400, 8, 1, 1, 0, seed=0, lengths=lengths, group=10)
    epoch = [i for step in range(50) for i in grouped.global_indices(step)]
    assert sorted(epoch) == list(range(400))

    def padding(plan):
        return sum(max(lengths[i] for i in plan.global_indices(s)) * 8 - sum(lengths[i] for i in plan.global_indices(s))
                   for s in range(50))

    assert padding(grouped) < padding(plain) / 3
