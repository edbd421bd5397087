"""Tests of torchslim.data: epochs reshuffle through set_epoch, and a resume continues the epoch it was in."""
from __future__ import annotations

import pytest
import torch

import torchslim as slim
from torchslim.data import ResumableIterable, set_epoch


def distributed_loader(rank: int = 0) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(torch.arange(16))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
    return torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler)


def rows(batches) -> list[list[int]]:
    return [b[0].tolist() for b in batches]


def flat(batches: list[list[int]]) -> list[int]:
    return [r for batch in batches for r in batch]


def test_each_epoch_of_a_distributed_sampler_draws_a_new_order():
    epochs = rows(slim.data.repeat(distributed_loader(), num_epochs=3))
    first, second, third = epochs[:4], epochs[4:8], epochs[8:]
    assert first != second and second != third
    other = rows(slim.data.repeat(distributed_loader(rank=1), num_epochs=3))
    for e in range(3):  # in each epoch the two replicas split the 16 rows between them
        mine, theirs = flat(epochs[4 * e:4 * e + 4]), flat(other[4 * e:4 * e + 4])
        assert sorted(mine + theirs) == list(range(16))
    # The order of epoch e is DistributedSampler's own for epoch e.
    sampler = torch.utils.data.DistributedSampler(range(16), num_replicas=2, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(1)
    assert flat(second) == list(sampler)


def test_set_epoch_reaches_the_data_its_sampler_and_its_batch_sampler():
    class Epochs:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.seen.append(epoch)

        def __iter__(self):
            return iter([[0, 1]])

        def __len__(self) -> int:
            return 1

    batch_sampler = Epochs()
    loader = torch.utils.data.DataLoader(list(range(2)), batch_sampler=batch_sampler)
    assert set_epoch(loader, 5) == [batch_sampler] and batch_sampler.seen == [5]
    list(ResumableIterable(loader, num_epochs=2))
    assert batch_sampler.seen == [5, 0, 1]
    assert set_epoch([1, 2], 0) == []  # nothing has set_epoch: nothing called


def test_a_resume_inside_the_second_epoch_continues_that_epochs_order(tmp_path):
    def run(steps: int, logdir: str) -> list[list[int]]:
        slim.collections.reset()
        net = torch.nn.Linear(1, 1)
        seen: list[list[int]] = []

        def total_loss(batch):
            seen.append(batch[0].tolist())
            return net(batch[0].float().unsqueeze(1)).pow(2).mean()

        op = slim.learning.create_train_op(total_loss, torch.optim.SGD(net.parameters(), lr=0.01), model=net)
        slim.learning.train(op, logdir, data=slim.data.repeat(distributed_loader(), num_epochs=2),
                            number_of_steps=steps, log_every_n_steps=0, save_interval_secs=None,
                            save_summaries_secs=None)
        return seen

    whole = run(8, str(tmp_path / "whole"))
    assert whole[:4] != whole[4:]
    before = run(6, str(tmp_path / "resumed"))  # stops in epoch 2 after its 2nd batch; the final checkpoint
    after = run(8, str(tmp_path / "resumed"))
    assert before == whole[:6] and after == whole[6:]
    first_stop = slim.checkpoint.list_checkpoints(str(tmp_path / "resumed"))[0]
    state = slim.checkpoint.load_checkpoint(first_stop)
    assert (state["global_step"], state["data"]["epoch"], state["data"]["index"]) == (6, 1, 2)  # epoch 2 (of 0, 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_repeat_rejects_a_bad_number_of_epochs(bad):
    with pytest.raises(ValueError, match=f"num_epochs must be None or a positive int, got {bad}"):
        slim.data.repeat([1], num_epochs=bad)
