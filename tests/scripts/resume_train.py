"""A training job for the exact-resume tests: run it, kill it, run it again.

    python resume_train.py LOGDIR OUT [--steps 200] [--save-every 10] [--step-sleep 0.005] [--slow-save-marker PATH]
                           [--print-steps] [--save-sleep SECS --save-marker PATH] [--max-to-keep N]

Trains an MLP with dropout on a shuffled DataLoader (so weights, optimizer,
RNG streams and data position all matter), checkpointing every few steps,
and writes the final parameters and optimizer state to OUT. The fault tests
(test_resume.py, test_recovery.py) kill it, signal it, run two of it on one
logdir, and run it on read-only or full file systems.
"""
import argparse
import os
import time

import torch

import torchslim as slim
from torchslim import checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("logdir")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--save-every", type=int, default=10)
parser.add_argument("--step-sleep", type=float, default=0.005)
parser.add_argument("--slow-save-marker", default=None,
                    help="after the first checkpoint, write half of each checkpoint, touch this file, and pause")
parser.add_argument("--print-steps", action="store_true", help="print each global step on stdout once it is taken")
parser.add_argument("--save-sleep", type=float, default=0.0,
                    help="before writing each checkpoint, touch --save-marker and sleep this long")
parser.add_argument("--save-marker", default=None)
parser.add_argument("--max-to-keep", type=int, default=3)
args = parser.parse_args()

if args.save_sleep:
    unslowed_write = checkpoint._write_payload

    def sleepy_write(f, payload):
        open(args.save_marker, "w").close()
        time.sleep(args.save_sleep)
        unslowed_write(f, payload)

    checkpoint._write_payload = sleepy_write

if args.slow_save_marker:
    real_write = checkpoint._write_payload

    def slow_write(f, flat):
        if checkpoint.list_checkpoints(args.logdir):
            f.write(checkpoint.MAGIC + b"\0\0")  # the start of a header, on disk
            f.flush()
            os.fsync(f.fileno())
            open(args.slow_save_marker, "w").close()
            time.sleep(5.0)
            f.seek(0)
        real_write(f, flat)

    checkpoint._write_payload = slow_write

torch.manual_seed(1234)
g = torch.Generator().manual_seed(0)
x = torch.randn(320, 8, generator=g)
y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)


def total_loss(batch):
    images, labels = batch
    noise = torch.randn_like(images) * 0.01  # draws from the torch RNG every step
    return torch.nn.functional.cross_entropy(model(images + noise), labels)


def slow_step(train_op, batch, global_step, kwargs):
    time.sleep(args.step_sleep)
    result = slim.learning.train_step(train_op, batch, global_step, kwargs)
    if args.print_steps:
        print(train_op.step, flush=True)
    return result


train_op = slim.learning.create_train_op(total_loss, optimizer, scheduler=scheduler)
slim.learning.train(
    train_op, args.logdir, data=slim.data.repeat(loader), number_of_steps=args.steps,
    train_step_fn=slow_step, log_every_n_steps=0, save_interval_secs=None, save_interval_steps=args.save_every,
    save_summaries_secs=None, saver=checkpoint.Saver(max_to_keep=args.max_to_keep or None),
)
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": train_op.step}, args.out)
