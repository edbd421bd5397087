"""One rank of a small FSDP2 (or DDP) training run under slim.learning.train (tests/test_fsdp.py launches it).

    torchrun --nproc-per-node 2 fsdp_train.py --logdir D --out O [--ddp] [--kill-rank 1 --kill-at-save 8]

An MLP 8->16->4 with dropout; every rank starts from the same seed, then
draws its own dropout masks (torch.manual_seed(100 + rank)) and reads its
own shuffled shard of the data through slim.data.repeat, so an exact resume
needs each rank's own RNG streams and data position. Gradient clipping (per
tensor) and a gradient multiplier are on. Writes O.rank<R>.pt with the
losses of every step, the final full weights (gathered), the global step,
the restart count and the checkpoint the run restored from.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

import torchslim as slim
from torchslim import sharded_checkpoint, supervisor


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))


def make_shard(rank: int, batches: int = 6, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(2 * batches * batch, 8, generator=g)
    y = torch.randint(0, 4, (2 * batches * batch,), generator=g)
    rows = slice(rank * batches * batch, (rank + 1) * batches * batch)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[rows], y[rows]), batch_size=batch,
                                       shuffle=True, generator=torch.Generator().manual_seed(7 + rank))


def kill_during_dcp_write(rank: int) -> None:
    """Makes this rank die (SIGKILL) while DCP writes its shard: a partial file, then nothing."""
    from torch.distributed.checkpoint import filesystem

    def write_data(self, plan, planner):
        with open(os.path.join(str(self.path), f"__{rank}_0.distcp"), "wb") as f:
            f.write(b"partial shard")
            f.flush()
        print(f"rank {rank}: killing myself while writing {self.path}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    filesystem.FileSystemWriter.write_data = write_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--max-to-keep", type=int, default=2)
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of fully_shard")
    parser.add_argument("--sync", action="store_true", help="pass a SyncReplicasOptimizer (FSDP must ignore it)")
    parser.add_argument("--kill-rank", type=int, default=None, help="this rank dies while writing its shard ...")
    parser.add_argument("--kill-at-save", type=int, default=None, help="... of the checkpoint of this step (first attempt)")
    parser.add_argument("--poison-rank", type=int, default=None, help="puts a NaN in this rank's gradient shard ...")
    parser.add_argument("--poison-at-step", type=int, default=None, help="... at this step")
    args = parser.parse_args(argv)

    slim.distributed.initialize()
    rank, world = slim.distributed.get_rank(), slim.distributed.get_world_size()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    model = make_model()
    if args.ddp:
        net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[3])
        fully_shard(model)
        net = model
    torch.manual_seed(100 + rank)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    sync = slim.SyncReplicasOptimizer(optimizer) if args.sync else None

    def total_loss(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(net(x), y)

    train_op = slim.learning.create_train_op(total_loss, sync or optimizer, clip_gradient_norm=0.3, model=model,
                                             gradient_multipliers={model[3].weight: 2.0})
    if args.poison_rank == rank:
        def poison(params):
            if train_op.step + 1 == args.poison_at_step:
                local = model[0].weight.grad.to_local()
                local.view(-1)[0] = float("nan")
        train_op.after_backward.insert(0, poison)
    if args.kill_rank == rank and restarts == 0:
        real_save = sharded_checkpoint.ShardedSaver.save

        def save(self, logdir, state, global_step, now=None):
            if global_step == args.kill_at_save:
                kill_during_dcp_write(rank)
            return real_save(self, logdir, state, global_step, now)

        sharded_checkpoint.ShardedSaver.save = save

    losses: list[float] = []

    def train_step(op, batch, global_step, kwargs):
        loss, stop = slim.learning.train_step(op, batch, global_step, kwargs)
        losses.append(loss.item())
        return loss, stop

    saver = slim.checkpoint.Saver(max_to_keep=args.max_to_keep)
    restored: list[str | None] = [None]
    real_start = supervisor.Supervisor.start

    def start(self):
        real_start(self)
        restored[0] = self.restored_from

    supervisor.Supervisor.start = start
    slim.learning.train(
        train_op, args.logdir, data=slim.data.repeat(make_shard(rank)), train_step_fn=train_step,
        number_of_steps=args.steps, sync_optimizer=sync, log_every_n_steps=0, saver=saver,
        save_interval_secs=None, save_interval_steps=args.save_steps, save_summaries_secs=None,
    )
    if args.ddp:
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"losses": losses, "params": params, "step": train_op.step, "restarts": restarts,
                "restored_from": restored[0], "world": world}, f"{args.out}.rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
