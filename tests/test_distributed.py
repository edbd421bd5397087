"""Tests of torchslim.distributed and the modules it gathers (process_group, sync_replicas, replicas, hogwild).

The multi-process tests (marked slow) launch real processes on 127.0.0.1 with
gloo: two replicas with a master URL, torchrun with restarts, run_hogwild.
torchrun across two network namespaces is in test_multinode.py.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

import torchslim as slim
from torchslim import distributed
from torchslim.learning import GlobalStep, create_train_op

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "dist_scripts")
REPLICA = os.path.join(SCRIPTS, "replica.py")
LOGISTIC = os.path.join(SCRIPTS, "logistic.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env(base: dict, **extra: str) -> dict:
    env = dict(base)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def launch_pair(python_exe, script, args_of_rank, env, **extra_env) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [python_exe, script, *args_of_rank(rank)],
            env=child_env(env, RANK=str(rank), WORLD_SIZE="2", **extra_env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout + stderr))
    return out


def assert_params_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def single_process_group(tmp_path):
    """A world of one gloo replica in this process, destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One process, batch 32, 50 steps: what two replicas of batch 16 must reproduce."""
    d = tmp_path_factory.mktemp("baseline")
    load_script(REPLICA).main(["--logdir", str(d / "log"), "--out", str(d / "out"), "--batch", "32"])
    return torch.load(str(d / "out.rank0.pt"))


# --------------------------------------------------------------------------- SyncReplicasOptimizer


def test_sync_optimizer_in_one_process_is_the_wrapped_optimizer():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    plain = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(sync, step_size=2, gamma=0.5)
    plain_scheduler = torch.optim.lr_scheduler.StepLR(plain, step_size=2, gamma=0.5)
    x = torch.randn(4, 3)
    for _ in range(5):
        for net, opt, sch in ((a, plain, plain_scheduler), (b, sync, scheduler)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
            sch.step()
    assert_params_close(a.state_dict(), b.state_dict(), atol=0)
    assert sync.param_groups[0]["lr"] == plain.param_groups[0]["lr"] == 0.025
    assert sync.state_dict()["state"].keys() == plain.state_dict()["state"].keys()
    sync.load_state_dict(plain.state_dict())  # checkpoints move between wrapped and plain optimizers


def test_sync_optimizer_rejects_bad_arguments():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="opt must be a torch.optim.Optimizer, got str"):
        slim.SyncReplicasOptimizer("sgd")
    with pytest.raises(ValueError, match="already a SyncReplicasOptimizer"):
        slim.SyncReplicasOptimizer(slim.SyncReplicasOptimizer(opt))
    with pytest.raises(ValueError, match=r"replicas_to_aggregate must be None or an int >= 1, got 0"):
        slim.SyncReplicasOptimizer(opt, replicas_to_aggregate=0)
    with pytest.raises(ValueError, match=r"replicas_to_aggregate \(2\) must equal total_num_replicas \(3\)"):
        slim.SyncReplicasOptimizer(opt, replicas_to_aggregate=2, total_num_replicas=3)
    with pytest.raises(ValueError, match="bucket_cap_mb must be a positive number, got -1"):
        slim.SyncReplicasOptimizer(opt, bucket_cap_mb=-1)


def _op(net: torch.nn.Module, optimizer: torch.optim.Optimizer):
    return create_train_op(lambda: net(torch.ones(2, 2)).sum(), optimizer, global_step=GlobalStep(), model=net)


def test_prepare_in_one_process():
    net = torch.nn.Linear(2, 1)
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    replica = distributed.prepare(_op(net, sync), sync_optimizer=sync)
    assert (replica.is_chief, replica.rank, replica.world_size, replica.should_stop()) == (True, 0, 1, False)
    assert distributed.prepare(_op(net, sync), sync_optimizer=[sync], is_chief=False).is_chief is False
    # the train op may also be built from the wrapped optimizer itself
    assert distributed.prepare(_op(net, sync.optimizer), sync_optimizer=sync).is_chief is True


def test_prepare_rejects_bad_arguments():
    net = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    op = _op(net, sgd)
    other = slim.SyncReplicasOptimizer(torch.optim.Adam(torch.nn.Linear(2, 1).parameters()))
    with pytest.raises(ValueError, match="sync_optimizer wraps Adam but the train op steps another optimizer"):
        distributed.prepare(op, sync_optimizer=other)
    with pytest.raises(ValueError, match="must be a slim.SyncReplicasOptimizer .* got SGD"):
        distributed.prepare(op, sync_optimizer=sgd)
    with pytest.raises(ValueError, match="startup_delay_steps must be zero when sync_optimizer is supplied"):
        distributed.prepare(op, sync_optimizer=slim.SyncReplicasOptimizer(sgd), startup_delay_steps=3)
    with pytest.raises(ValueError, match="replicas_to_aggregate=2 but there are 1 replicas"):
        distributed.prepare(op, sync_optimizer=slim.SyncReplicasOptimizer(sgd, replicas_to_aggregate=2))
    with pytest.raises(ValueError, match="train_op must be made by create_train_op, got str"):
        distributed.prepare("op")
    with pytest.raises(ValueError, match="master must be '', 'tcp://host:port'"):
        distributed.prepare(op, master="http://host:1")


def test_initialize_arguments(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed.initialize("") is False and not dist.is_initialized()
    with pytest.raises(ValueError, match="world_size is 2 but master is ''"):
        distributed.initialize("", world_size=2)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs this replica's rank and the world size"):
        distributed.initialize("tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="rank must be < world_size, got rank=2 and world_size=2"):
        distributed.initialize("tcp://127.0.0.1:1", rank=2, world_size=2)
    with pytest.raises(ValueError, match="timeout must be None or a positive number of seconds, got 0"):
        distributed.initialize("tcp://127.0.0.1:1", rank=0, world_size=2, timeout=0)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$TORCHSLIM_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        distributed.default_timeout()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.default_timeout() == 12.5


def test_run_hogwild_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_workers must be an int >= 1, got 0"):
        distributed.run_hogwild(print, 0)
    with pytest.raises(ValueError, match="start_method must be one of"):
        distributed.run_hogwild(print, 2, start_method="teleport")
    with pytest.raises(ValueError, match="fn must be a function"):
        distributed.run_hogwild(None, 2)
    with pytest.raises(ValueError, match="args must be a tuple"):
        distributed.run_hogwild(print, 2, args="model")


# --------------------------------------------------------------------------- gradient averaging, in process


class TwoBranches(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 64)
        self.b = torch.nn.Linear(64, 64)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_bucketed_averaging_keeps_gradients_and_unused_ones_stay_none(single_process_group):
    torch.manual_seed(0)
    net, ref = TwoBranches(), TwoBranches()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(8, 64)
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), bucket_cap_mb=0.01)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    op = create_train_op(lambda: net(x).pow(2).mean(), sync, global_step=GlobalStep(), model=net, clip_gradient_norm=1.0)
    replica = distributed.prepare(op, sync_optimizer=sync)
    # Buckets fill in reverse parameter order and close once they hold >= 0.01 MB (10486 bytes):
    # unused.bias 16 B + unused.weight 64 B + b.bias 256 B + b.weight 16384 B closes the first;
    # a.bias + a.weight make the second.
    averager = sync._averager
    names = {id(p): n for n, p in net.named_parameters()}
    assert [[names[id(p)] for p in b.params] for b in averager.buckets] == [
        ["unused.bias", "unused.weight", "b.bias", "b.weight"], ["a.bias", "a.weight"]]
    for _ in range(3):
        op()
        plain.zero_grad()
        loss = ref(x).pow(2).mean()
        loss.backward()
        slim.learning.clip_gradient_norms([(p.grad, p) for p in ref.parameters() if p.grad is not None], 1.0)
        plain.step()
        assert net.unused.weight.grad is None and net.unused.bias.grad is None
    assert_params_close(net.state_dict(), ref.state_dict(), atol=1e-6)
    replica.close()
    assert op.after_backward == [] and sync._averager is None
    assert all(len(p._post_accumulate_grad_hooks or {}) == 0 for p in net.parameters())


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_replicas_match_one_process_with_twice_the_batch_and_only_the_chief_writes(
    tmp_path, baseline, python_exe, subprocess_env
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    chief_dir, other_dir = tmp_path / "chief", tmp_path / "other"
    other_dir.mkdir()
    init = f"file://{tmp_path / 'rendezvous'}"

    def args(rank: int) -> list[str]:
        logdir = chief_dir if rank == 0 else other_dir
        # The chief's time trigger fires after nearly every step: each time, every replica must follow it.
        return ["--logdir", str(logdir), "--out", str(tmp_path / "out"), "--master", init,
                "--batch", "16", "--save-secs", "1e-6", "--summary-steps", "10"]

    results = finish(launch_pair(python_exe, REPLICA, args, subprocess_env))
    for rc, log in results:
        assert rc == 0, log
    for rank in range(2):
        out = torch.load(str(tmp_path / f"out.rank{rank}.pt"))
        assert (out["step"], out["world"]) == (50, 2)
        # Each replica started from other random weights; the chief's were broadcast. So are its buffers
        # every step: the count the chief moves by 1 per step ends at 50 on both replicas.
        assert_params_close(out["params"], baseline["params"])
        assert out["params"]["3.count"] == 50
    assert os.listdir(other_dir) == []  # the non-chief wrote nothing into its logdir
    saved = [slim.checkpoint.checkpoint_step(p) for p in slim.checkpoint.list_checkpoints(str(chief_dir))]
    assert saved == [46, 47, 48, 49, 50]  # one per step (max_to_keep=5), each with both replicas' parts
    assert all(len(slim.checkpoint.load_checkpoint(p)["replicas"]) == 2
               for p in slim.checkpoint.list_checkpoints(str(chief_dir)))
    events = EventAccumulator(str(chief_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("losses/total_loss")] == [10, 20, 30, 40, 50]


@pytest.mark.slow
def test_a_users_own_ddp_model_trains_with_the_chief_picked_by_slim(tmp_path, baseline, python_exe, subprocess_env):
    init = f"file://{tmp_path / 'rendezvous'}"

    def args(rank: int) -> list[str]:
        return ["--logdir", str(tmp_path / "log"), "--out", str(tmp_path / "out"), "--master", init, "--ddp",
                "--save-secs", "1e-6"]

    for rc, log in finish(launch_pair(python_exe, REPLICA, args, subprocess_env)):
        assert rc == 0, log
    for rank in range(2):
        params = torch.load(str(tmp_path / f"out.rank{rank}.pt"))["params"]
        del params["3.count"]  # DDP broadcasts buffers before the forward pass, torchslim after backward
        assert_params_close(params, {k: v for k, v in baseline["params"].items() if k != "3.count"})
    path = slim.checkpoint.latest_checkpoint(str(tmp_path / "log"))
    assert slim.checkpoint.checkpoint_step(path) == 50
    # Written by two DDP replicas, read by one plain model: the plain names, strict=True, and evaluate_once.
    plain = load_script(REPLICA).make_model(seed=7)
    assert slim.checkpoint.restore_model(path, plain, strict=True) == 50
    assert_params_close(plain.state_dict(), baseline["params"])
    x = torch.ones(1, 8)
    fresh = load_script(REPLICA).make_model(seed=8)
    value = slim.evaluation.evaluate_once(path, str(tmp_path / "eval"), eval_op=lambda: fresh(x),
                                          final_op=lambda: fresh(x).item())
    assert value == plain(x).item()


@pytest.mark.slow
def test_hogwild_reaches_the_synchronous_loss_target(tmp_path, python_exe, subprocess_env):
    port = free_port()

    def sync_args(rank: int) -> list[str]:
        return ["--mode", "sync", "--master", f"tcp://127.0.0.1:{port}", "--logdir", str(tmp_path / "sync"),
                "--out", str(tmp_path / "sync.json")]

    sync_procs = launch_pair(python_exe, LOGISTIC, sync_args, subprocess_env)
    hogwild = subprocess.run(
        # fork keeps the test fast (no second torch import per worker); spawn, the default, runs the same code.
        [python_exe, LOGISTIC, "--mode", "hogwild", "--workers", "2", "--startup-delay", "50", "--start-method", "fork",
         "--logdir", str(tmp_path / "hogwild"), "--out", str(tmp_path / "hogwild.json")],
        env=child_env(subprocess_env), capture_output=True, text=True, timeout=90,
    )
    assert hogwild.returncode == 0, hogwild.stdout + hogwild.stderr
    for rc, log in finish(sync_procs):
        assert rc == 0, log
    sync = json.loads((tmp_path / "sync.json").read_text())
    hog = json.loads((tmp_path / "hogwild.json").read_text())
    # TF-Slim's learning_test target for this problem: log loss < 0.015 after 300 steps.
    assert sync["loss"] < 0.015 and hog["loss"] < 0.015, (sync, hog)
    assert sync["checkpoint_step"] == hog["checkpoint_step"] == 300
    chief, other = hog["workers"]
    # One global step shared by the workers: their steps add up to number_of_steps.
    assert chief["steps"] + other["steps"] == 300 and chief["final_step"] == 300
    assert chief["first_step"] == 0 and other["first_step"] >= 50  # startup_delay_steps=50
    assert other["steps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("hang", [False, True], ids=["killed", "hung"])
def test_survivor_fails_with_a_clear_error_within_the_timeout(tmp_path, python_exe, subprocess_env, hang):
    timeout = 4
    port = free_port()

    def args(rank: int) -> list[str]:
        extra = ["--hang"] if hang else []
        return ["--logdir", str(tmp_path / f"log{rank}"), "--out", str(tmp_path / "out"), "--steps", "1000",
                "--master", f"tcp://127.0.0.1:{port}", "--kill-rank", "1", "--kill-at-step", "10", *extra]

    survivor, peer = launch_pair(python_exe, REPLICA, args, subprocess_env, TORCHSLIM_DIST_TIMEOUT=str(timeout))
    try:
        line = peer.stdout.readline()  # printed just before it dies or hangs
        assert "before step 10" in line, line + peer.stderr.read()
        gone = time.monotonic()
        _, stderr = survivor.communicate(timeout=60)
        waited = time.monotonic() - gone
    finally:
        if peer.poll() is None:
            os.kill(peer.pid, signal.SIGKILL)
        finish([peer, survivor])
    assert survivor.returncode != 0
    assert waited < timeout + 8, waited  # margin for process exit on a loaded 2-core machine
    assert "DistributedError: replica 0 of 2: the gradient all-reduce at global step 10 failed: a peer replica died" in stderr
    assert f"The collective timeout is {timeout} s" in stderr
    if hang:  # gloo words it 'Timed out ...' or 'Application timeout caused pair closure', by timing
        assert "Timed out" in stderr or "timeout caused pair closure" in stderr


# --------------------------------------------------------------------------- restarts agree on their generation


def _agree_all(store, ranks, timeout=10.0, delay_leader=0.0):
    import threading

    got: dict = {}
    errors: list = []

    def run(rank: int) -> None:
        try:
            if rank == 0 and delay_leader:
                time.sleep(delay_leader)
            got[rank] = distributed.agree_on_generation(store, rank, len(ranks), timeout, prefix="run")
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    assert not errors, errors
    return got


def test_restarted_rounds_agree_on_a_new_generation_despite_a_dead_rounds_keys():
    store = dist.HashStore()  # torchrun's agent store outlives the rounds: keys of dead rounds stay
    assert _agree_all(store, [0, 1]) == {0: 1, 1: 1}
    # The next round's rank 1 starts before its leader and first reads generation 1, whose welcome for
    # rank 1 (the dead round's) is still in the store: it must wait for the new leader instead.
    assert _agree_all(store, [0, 1], delay_leader=0.3) == {0: 2, 1: 2}
    store.add("run/generation", 1)  # a leader that drew generation 3 and died before anyone greeted it
    assert _agree_all(store, [0, 1], delay_leader=0.3) == {0: 4, 1: 4}


def test_generation_agreement_fails_clearly_when_a_peer_never_comes():
    with pytest.raises(distributed.DistributedError, match=r"replica 0 of 2: ranks \[1\] did not say hello within 0 s"):
        distributed.agree_on_generation(dist.HashStore(), 0, 2, 0.2)


# --------------------------------------------------------------------------- per-replica state, wrapped models


def _sync_run(logdir, steps, net=None):
    slim.collections.reset()
    torch.manual_seed(0)
    net = net or torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    op = create_train_op(lambda batch: net(batch).pow(2).mean(), sync, model=net)
    data = slim.data.repeat(list(torch.randn(6, 3, 4)))
    slim.learning.train(op, str(logdir), data=data, sync_optimizer=sync, number_of_steps=steps, log_every_n_steps=0,
                        save_interval_secs=None, save_summaries_secs=None)
    return net


def test_each_replica_part_is_in_the_checkpoint_and_another_world_size_is_refused(tmp_path, single_process_group):
    _sync_run(tmp_path / "log", 4)
    path = slim.checkpoint.latest_checkpoint(str(tmp_path / "log"))
    state = slim.checkpoint.load_checkpoint(path)
    (part,) = state["replicas"]  # one replica: its own RNG streams and data position
    assert part["data"] == {**state["data"], "epoch_rng": part["data"]["epoch_rng"]} and part["data"]["index"] == 4
    assert torch.equal(part["rng"]["torch"], state["rng"]["torch"])
    state["replicas"] = [part, part]  # as if two replicas had written it
    slim.checkpoint.save_checkpoint(path, state)
    with pytest.raises(ValueError, match=r"model.ckpt-4.pt' was written by 2 replicas but this run has 1; .* Resume "
                                         r"with 2 replicas"):
        _sync_run(tmp_path / "log", 8)


def test_the_chiefs_time_trigger_reaches_every_replica_in_the_gradient_bucket(tmp_path, single_process_group):
    slim.collections.reset()
    net = torch.nn.Linear(4, 1)
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    op = create_train_op(lambda batch: net(batch).pow(2).mean(), sync, model=net)
    asked = []

    class Clock(slim.triggers.Trigger):  # due from the third step on
        def __call__(self, step, t=None):
            asked.append(step)
            return step >= 3

    sv = slim.supervisor.Supervisor(op, str(tmp_path), data=list(torch.randn(4, 2, 4)), sync_optimizer=sync,
                                    save_interval_secs=None, save_summaries_secs=None)
    sv.save_trigger = Clock()
    with sv:
        assert sv.replica._save_mode == "piggyback"
        batches = sv.batches()
        while not sv.should_stop(number_of_steps=4):
            sv.after_step(op(next(batches)))
        sv.finish()
    assert asked == [1, 2, 3, 4]  # asked once per step, while the step's last bucket left
    assert [slim.checkpoint.checkpoint_step(p) for p in slim.checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]


def test_a_ddp_wrapped_model_checkpoints_under_the_plain_models_names(tmp_path, single_process_group):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(plain)
    op = create_train_op(lambda batch: ddp(batch).pow(2).mean(), torch.optim.SGD(ddp.parameters(), lr=0.1))
    assert op.model is plain
    slim.learning.train(op, str(tmp_path), data=list(torch.randn(3, 2, 4)), log_every_n_steps=0)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    assert slim.checkpoint.restore_model(slim.checkpoint.latest_checkpoint(str(tmp_path)), fresh, strict=True) == 3
    assert_params_close(fresh.state_dict(), plain.state_dict(), atol=0)


def test_a_compiled_model_checkpoints_under_the_plain_models_names(tmp_path):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    compiled = torch.compile(plain, backend="eager")  # the wrapper is what matters here, not inductor's code
    op = create_train_op(lambda batch: compiled(batch).pow(2).mean(), torch.optim.SGD(plain.parameters(), lr=0.1))
    slim.learning.train(op, str(tmp_path), data=list(torch.randn(3, 2, 4)), log_every_n_steps=0)
    state = slim.checkpoint.load_checkpoint(slim.checkpoint.latest_checkpoint(str(tmp_path)))
    assert sorted(state["model"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    fresh.load_state_dict(state["model"], strict=True)
    assert_params_close(fresh.state_dict(), plain.state_dict(), atol=0)


def test_every_distributed_module_docstring_runs():
    import doctest

    from torchslim import _modules, hogwild, process_group, replicas, sync_replicas

    for module in (distributed, process_group, sync_replicas, replicas, hogwild, _modules):
        slim.collections.reset()
        # run as user code (functions defined in a torchslim module would be skipped by modules_of)
        result = doctest.testmod(module, extraglobs={"__name__": "__doctest__"}, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.slow
def test_every_replica_resumes_its_own_shuffle_dropout_and_streams_bitwise(tmp_path, python_exe, subprocess_env):
    shards = os.path.join(SCRIPTS, "shards.py")
    ref = tmp_path / "ref"

    def args(rank: int) -> list[str]:
        return ["--logdir", str(tmp_path / "ref_log"), "--out", str(ref), "--master", f"file://{tmp_path / 'rdzv'}"]

    for rc, log in finish(launch_pair(python_exe, shards, args, subprocess_env), timeout=120):
        assert rc == 0, log
    killed = tmp_path / "killed"
    cmd = [
        python_exe, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "0.1",
        shards, "--logdir", str(tmp_path / "log"), "--out", str(killed), "--kill-rank", "1", "--kill-at-step", "13",
    ]
    run = subprocess.run(cmd, env=child_env(subprocess_env), capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 1: killing myself before step 13" in run.stdout + run.stderr

    def batches(prefix, rank):
        with open(f"{prefix}.rank{rank}.batches") as f:
            return [json.loads(line) for line in f]

    orders = []
    for rank in range(2):
        expected = {b["step"]: b["rows"] for b in batches(ref, rank)}
        assert sorted(expected) == list(range(1, 17))  # 8 batches of 4 rows per epoch, two epochs
        resumed = [b for b in batches(killed, rank) if b["attempt"] == 1]
        assert [b["step"] for b in resumed] == list(range(11, 17))  # from the checkpoint at step 10, in epoch 2
        assert all(b["rows"] == expected[b["step"]] for b in resumed), (rank, resumed)
        out, want = torch.load(str(killed) + f".rank{rank}.pt"), torch.load(str(ref) + f".rank{rank}.pt")
        assert out["step"] == want["step"] == 16 and out["restarts"] == 1
        for k in want["params"]:
            assert torch.equal(out["params"][k], want["params"][k]), (rank, k)
        orders.append([expected[s] for s in range(1, 17)])
    assert all(r % 2 == 0 for step in orders[0] for r in step) and orders[0][:8] != orders[0][8:]  # own shard, reshuffled
    parts = slim.checkpoint.load_checkpoint(slim.checkpoint.latest_checkpoint(str(tmp_path / "log")))["replicas"]
    assert len(parts) == 2 and not torch.equal(parts[0]["rng"]["torch"], parts[1]["rng"]["torch"])


def test_accumulation_under_sync_replicas_communicates_on_the_last_micro_batch_only(single_process_group, monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    ref = copy.deepcopy(net)
    x = torch.randn(32, 64)
    sync = slim.SyncReplicasOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), bucket_cap_mb=0.01)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    forwards = [0]

    def loss(batch):
        forwards[0] += 1
        return net(batch).pow(2).mean()

    op = create_train_op(loss, sync, global_step=GlobalStep(), model=net, accumulate_steps=4)
    replica = distributed.prepare(op, sync_optimizer=sync)
    launched_after = []  # how many micro-batch forwards had run when each all-reduce was launched
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: launched_after.append(forwards[0]) or real_all_reduce(*a, **k))
    for _ in range(3):
        op(slim.learning.MicroBatches(x.chunk(4)))
        plain.zero_grad()
        ref(x).pow(2).mean().backward()
        plain.step()
    # Buckets fill in reverse order and close at >= 10486 bytes: 2.bias + 2.weight (16640 B), then 0.bias + 0.weight.
    # Every parameter gets a gradient, so buckets launch from backward: both during the 4th micro-batch's.
    assert launched_after == [4, 4, 8, 8, 12, 12]
    assert_params_close(net.state_dict(), ref.state_dict(), atol=1e-6)
    replica.close()
