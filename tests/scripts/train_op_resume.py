"""A training job for test_train_op's kill -9 test: accumulation, fp16 loss scaling and moving averages.

    python train_op_resume.py LOGDIR OUT

Writes the final weights, moving averages and GradScaler state to OUT.
"""
import sys
import time

import torch

import torchslim as slim

logdir, out = sys.argv[1], sys.argv[2]
torch.manual_seed(1234)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g)
y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
ema = slim.variables.ExponentialMovingAverage(0.9, num_updates=slim.learning.get_or_create_global_step())
slim.collections.add_to_collection(slim.GraphKeys.UPDATE_OPS, ema.apply(model))


def total_loss(batch):
    images, labels = batch
    return torch.nn.functional.cross_entropy(model(images), labels)


def slow_step(train_op, batch, global_step, kwargs):
    time.sleep(0.01)
    return slim.learning.train_step(train_op, batch, global_step, kwargs)


train_op = slim.learning.create_train_op(total_loss, optimizer, mixed_precision="fp16", accumulate_steps=4)
train_op.grad_scaler = torch.amp.GradScaler("cpu", growth_interval=5)
slim.learning.train(train_op, logdir, data=slim.data.repeat(loader), number_of_steps=60, train_step_fn=slow_step,
                    log_every_n_steps=0, save_interval_secs=None, save_interval_steps=10, save_summaries_secs=None)
torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "scaler": train_op.grad_scaler.state_dict(),
            "step": train_op.step}, out)
