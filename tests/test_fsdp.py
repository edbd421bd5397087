"""Tests of torchslim.fsdp and torchslim.sharded_checkpoint: FSDP2 training and sharded (DCP) checkpoints.

The fast tests run in this process: sharded checkpoints without a process
group (one writer), and FSDP2 in a world of one gloo rank. The slow ones
launch two real ranks with torchrun (gloo, CPU): FSDP2 against DDP, a rank
SIGKILLed while writing its shard, a NaN in one rank's gradient shard.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import torchslim as slim
from torchslim import checkpoint, fsdp, sharded_checkpoint
from torchslim.checkpoint import CorruptCheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "fsdp_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict) -> dict:
    env = {k: v for k, v in base.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun_cmd(python_exe: str, *args: str, restarts: int = 0) -> list[str]:
    return [python_exe, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "--monitor-interval", "0.1", SCRIPT, *args]


# ------------------------------------------------------------------ sharded checkpoints, one writer


def test_save_commits_a_marker_last_and_load_full_returns_the_tensors(tmp_path):
    saver = sharded_checkpoint.ShardedSaver()
    w = torch.arange(6.0).reshape(2, 3)
    path = saver.save(str(tmp_path), {"global_step": 3, "model": {"w": w}}, global_step=3)
    assert path == str(tmp_path / "model.ckpt-3.pt")
    assert sharded_checkpoint.is_sharded(path) and not sharded_checkpoint.is_sharded(str(tmp_path / "nothing"))
    marker = sharded_checkpoint.verify_sharded(path)
    # Every file DCP wrote is in the marker: rank 0's shard and .metadata.
    assert sorted(marker["files"]) == sorted(os.listdir(sharded_checkpoint.shards_dir(path)))
    assert (marker["global_step"], marker["world_size"]) == (3, 1)
    state = checkpoint.load_checkpoint(path)  # dispatches to load_full
    assert state["global_step"] == 3 and torch.equal(state["model"]["w"], w)
    assert checkpoint.latest_checkpoint(str(tmp_path)) == path


def test_a_damaged_shard_makes_the_checkpoint_invalid_and_the_previous_one_is_used(tmp_path):
    saver = sharded_checkpoint.ShardedSaver()
    first = saver.save(str(tmp_path), {"global_step": 1, "w": torch.ones(4)}, global_step=1)
    second = saver.save(str(tmp_path), {"global_step": 2, "w": torch.ones(4) * 2}, global_step=2)
    shard = os.path.join(sharded_checkpoint.shards_dir(second), "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 3)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        checkpoint.load_checkpoint(second)
    assert sharded_checkpoint.latest_valid(str(tmp_path)) == first
    with open(shard, "r+b") as f:  # the size back, the first byte changed
        f.seek(0, os.SEEK_END)
        f.write(b"\0\0\0")
        f.seek(0)
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        sharded_checkpoint.verify_sharded(second)
    os.unlink(os.path.join(sharded_checkpoint.shards_dir(first), ".metadata"))
    assert sharded_checkpoint.latest_valid(str(tmp_path)) is None


def test_a_marker_is_verified_and_a_plain_checkpoint_is_not_a_marker(tmp_path):
    saver = sharded_checkpoint.ShardedSaver()
    path = saver.save(str(tmp_path), {"global_step": 1}, global_step=1)
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(b"X")
    with pytest.raises(CorruptCheckpointError, match="commit marker"):
        sharded_checkpoint.read_marker(path)
    plain = str(tmp_path / "model.ckpt-2.pt")
    checkpoint.save_checkpoint(plain, {"global_step": 2})
    assert not sharded_checkpoint.is_sharded(plain)
    with pytest.raises(CorruptCheckpointError, match="bad magic"):
        sharded_checkpoint.read_marker(plain)


def test_max_to_keep_prunes_old_checkpoints_and_what_killed_saves_left(tmp_path):
    saver = sharded_checkpoint.ShardedSaver(max_to_keep=2)
    os.makedirs(tmp_path / "model.ckpt-2.shards")  # a save killed before its marker
    (tmp_path / "model.ckpt-2.shards" / "__1_0.distcp").write_bytes(b"partial")
    for step in (1, 3, 4):
        saver.save(str(tmp_path), {"global_step": step}, global_step=step)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-3.pt", "model.ckpt-3.shards", "model.ckpt-4.pt",
                                            "model.ckpt-4.shards"]


def test_keep_checkpoint_every_n_hours_keeps_one_per_period(tmp_path):
    saver = sharded_checkpoint.ShardedSaver(max_to_keep=1, keep_checkpoint_every_n_hours=1)
    for step, hours in ((1, 0.0), (2, 0.5), (3, 1.2), (4, 1.3)):
        saver.save(str(tmp_path), {"global_step": step}, global_step=step, now=hours * 3600)
    steps = [checkpoint.checkpoint_step(p) for p in sharded_checkpoint.sharded_checkpoints(str(tmp_path))]
    assert steps == [3, 4]  # 3 is the first of the second hour; 1 and 2 fall in the first, already past


def test_saving_a_step_that_has_an_intact_checkpoint_keeps_it(tmp_path):
    saver = sharded_checkpoint.ShardedSaver()
    path = saver.save(str(tmp_path), {"global_step": 5, "w": torch.zeros(2)}, global_step=5)
    assert saver.save(str(tmp_path), {"global_step": 5, "w": torch.ones(2)}, global_step=5) == path
    assert torch.equal(sharded_checkpoint.load_full(path)["w"], torch.zeros(2))


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        sharded_checkpoint.ShardedSaver(max_to_keep=-1)
    with pytest.raises(ValueError, match="keep_checkpoint_every_n_hours"):
        sharded_checkpoint.ShardedSaver(keep_checkpoint_every_n_hours=0)
    with pytest.raises(ValueError, match="prefix"):
        sharded_checkpoint.ShardedSaver(prefix="a/b")
    with pytest.raises(ValueError, match="chief"):
        sharded_checkpoint.ShardedSaver(chief=-1)
    saver = sharded_checkpoint.ShardedSaver()
    with pytest.raises(ValueError, match="global_step"):
        saver.save(str(tmp_path / "d"), {}, global_step=-1)
    with pytest.raises(TypeError, match="mapping"):
        saver.save(str(tmp_path / "d"), [], global_step=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logdir"):
        saver.save("", {}, global_step=1)
    with pytest.raises(ValueError, match="marker"):
        sharded_checkpoint.shards_dir("/tmp/model.ckpt-1")
    assert not (tmp_path / "d").exists()


def test_is_fully_sharded_is_false_for_plain_modules():
    assert not fsdp.is_fully_sharded(torch.nn.Linear(2, 1))
    assert not fsdp.is_fully_sharded(None)


# ------------------------------------------------------------------ FSDP2 in a world of one rank


@pytest.fixture
def one_rank_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_mlp(root_only: bool = False) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    if root_only:
        fully_shard(model[2])
    else:
        fully_shard(model)
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g)) for _ in range(6)]


def test_one_rank_fsdp_trains_resumes_exactly_and_loads_into_a_plain_model(one_rank_group, tmp_path):
    def run(logdir: str, steps: int) -> tuple[torch.nn.Module, slim.learning.TrainOp]:
        slim.collections.reset()
        model = _sharded_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        op = slim.learning.create_train_op(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), opt,
                                           clip_gradient_norm=0.5, model=model)
        slim.learning.train(op, logdir, data=slim.data.repeat(_data()), number_of_steps=steps, log_every_n_steps=0,
                            save_interval_secs=None, save_summaries_secs=None)
        return model, op

    straight, _ = run(str(tmp_path / "a"), 8)
    run(str(tmp_path / "b"), 4)
    resumed, op = run(str(tmp_path / "b"), 8)
    assert op.step == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    path = checkpoint.latest_checkpoint(str(tmp_path / "b"))
    assert sharded_checkpoint.is_sharded(path) and checkpoint.checkpoint_step(path) == 8
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert checkpoint.restore_model(path, plain) == 8
    for name, p in plain.state_dict().items():
        assert torch.equal(p, straight.state_dict()[name].full_tensor()), name


@pytest.mark.parametrize(("check_numerics", "every", "steps", "saved"), [
    (True, 1, 5, [4, 5]), (True, 5, 12, [6, 7, 8, 9, 10, 11, 12]), (False, 5, 5, [3, 4, 5])],
    ids=["carried-by-the-flags-combined-every-step", "carried-by-the-flags-combined-every-5", "own-broadcast"])
def test_time_based_saves_happen_steps_after_the_chief_decides(one_rank_group, tmp_path, monkeypatch,
                                                               check_numerics, every, steps, saved):
    monkeypatch.setattr(fsdp.FSDPReplica, "numerics_every_n_steps", every)
    model = _sharded_mlp()
    op = slim.learning.create_train_op(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                                       torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                       check_numerics=check_numerics)
    saver = slim.checkpoint.Saver(max_to_keep=None)
    # Every step is due once the clock started (at step 1). Through its own broadcast the decision of step n
    # acts at n + 1. Carried, it waits for the next combine of the numerics flags (every `every` steps, and
    # in each save), and acts at the step after: the chief's 'save' of step 2 is carried at step 5 and acts
    # at 6, and each save's combine carries the next one. The last step is the final save.
    slim.learning.train(op, str(tmp_path), data=slim.data.repeat(_data()), number_of_steps=steps, log_every_n_steps=0,
                        save_interval_secs=1e-9, save_summaries_secs=None, saver=saver)
    steps = [checkpoint.checkpoint_step(p) for p in sharded_checkpoint.sharded_checkpoints(str(tmp_path))]
    assert steps == saved


@pytest.mark.parametrize("read", ["sync_numerics", "every-4-steps", "check_pending_numerics"])
def test_a_nan_in_a_gradient_shard_is_named_with_its_step_and_what_happened_to_the_weights(
        one_rank_group, monkeypatch, read):
    model = _sharded_mlp()
    op = slim.learning.create_train_op(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                                       torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    op.sync_numerics = read == "sync_numerics"
    monkeypatch.setattr(fsdp.FSDPReplica, "numerics_every_n_steps", 4)

    def poison(params):
        if op.step + 1 == 3:
            params[2].grad.to_local().view(-1)[0] = float("nan")

    op.after_backward.insert(0, poison)
    replica = slim.distributed.prepare(op)
    batches = iter(_data())
    op(next(batches)), op(next(batches))
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    named = r"step 3: NaN or Inf in the gradient shards of parameters \(rank 0: '?2.weight'?\) "
    if read == "sync_numerics":  # read before the update: the step does not run
        with pytest.raises(slim.learning.NumericsError, match=named + r"\(weights left as they were"):
            op(next(batches))
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    elif read == "every-4-steps":  # combined at step 4, read before step 5 runs any collective
        op(next(batches)), op(next(batches))
        assert not torch.isfinite(model[2].weight.full_tensor()).all()
        with pytest.raises(slim.learning.NumericsError, match=named + r"\(read at step 4: the updates from step 3"):
            op(next(batches))
        assert op.step == 4
    else:  # a log, a save or the end reads at once, before the weight check
        op(next(batches))
        with pytest.raises(slim.learning.NumericsError, match=named + r"\(read at step 3: the updates from step 3"):
            op.check_pending_numerics()
    replica.close()
    assert op.before_step == [] and op.before_numerics_read == [] and not op.gradients_checked_by_hooks


def test_docstring_examples_run():
    import doctest

    for module in (fsdp, sharded_checkpoint):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__


def test_the_replica_refuses_unsharded_parameters_and_gradient_summaries(one_rank_group):
    model = _sharded_mlp(root_only=True)  # model[0] is not sharded: nothing would reduce its gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    op = slim.learning.create_train_op(lambda: model(torch.ones(1, 4)).sum(), opt, model=model)
    with pytest.raises(ValueError, match="'0.weight' is trained but not sharded by fully_shard"):
        slim.distributed.prepare(op)
    op = slim.learning.create_train_op(lambda: model(torch.ones(1, 4)).sum(),
                                       torch.optim.SGD(model[2].parameters(), lr=0.1), model=model,
                                       summarize_gradients=True)
    with pytest.raises(ValueError, match="summarize_gradients"):
        slim.distributed.prepare(op)


# ------------------------------------------------------------------ two ranks under torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """FSDP2 and DDP, 2 ranks, 12 steps, checkpoints every 4 (max_to_keep 2); FSDP2 with rank 1 killed; a NaN."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    d = tmp_path_factory.mktemp("fsdp")
    procs = {}
    for name, extra, restarts in (  # launched together: most of each run is starting Python and torch
        ("fsdp", ["--sync"], 0),
        ("ddp", ["--ddp"], 0),
        ("killed", ["--kill-rank", "1", "--kill-at-save", "8"], 1),
        ("poisoned", ["--poison-rank", "1", "--poison-at-step", "3", "--steps", "5"], 0),
    ):
        cmd = torchrun_cmd(sys.executable, "--logdir", str(d / name), "--out", str(d / f"{name}.out"), *extra,
                           restarts=restarts)
        procs[name] = subprocess.Popen(cmd, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    out = {}
    for name, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
                p.communicate()
            raise
        out[name] = {"log": log, "logdir": str(d / name), "returncode": proc.returncode}
        if name != "poisoned":
            assert proc.returncode == 0, log
            out[name]["ranks"] = [torch.load(str(d / f"{name}.out.rank{r}.pt")) for r in range(2)]
    return out


@pytest.mark.slow
def test_fsdp2_trains_to_the_losses_of_ddp(runs):
    # Same model, data, dropout masks, clipping and multiplier: FSDP's reduce-scattered shards match
    # DDP's all-reduced gradients up to float rounding (a SyncReplicasOptimizer adds no second averaging).
    for rank in range(2):
        fsdp_losses, ddp_losses = runs["fsdp"]["ranks"][rank]["losses"], runs["ddp"]["ranks"][rank]["losses"]
        assert len(fsdp_losses) == 12
        torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(ddp_losses), atol=1e-5, rtol=1e-5)
    for name, p in runs["ddp"]["ranks"][0]["params"].items():
        torch.testing.assert_close(runs["fsdp"]["ranks"][0]["params"][name], p, atol=1e-5, rtol=1e-5)
    # Every rank wrote its shard; max_to_keep=2 left steps 8 and 12.
    markers = sharded_checkpoint.sharded_checkpoints(runs["fsdp"]["logdir"])
    assert [checkpoint.checkpoint_step(m) for m in markers] == [8, 12]
    files = sharded_checkpoint.verify_sharded(markers[-1])["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_and_the_resume_is_exact(runs):
    killed = runs["killed"]
    assert "rank 1: killing myself while writing" in killed["log"]
    # The survivor's error names what failed, unless torchrun's agent stopped it first (a race on a loaded machine).
    assert "saving sharded checkpoint" in killed["log"] or "closing signal SIGTERM" in killed["log"], killed["log"]
    for rank in range(2):
        out = killed["ranks"][rank]
        # The restarted ranks found no marker for step 8: they resumed from step 4, each with its own RNG
        # streams and data position, and ended bitwise where the uninterrupted run ended.
        assert (out["restarts"], os.path.basename(out["restored_from"]), out["step"]) == (1, "model.ckpt-4.pt", 12)
        assert out["losses"] == runs["fsdp"]["ranks"][rank]["losses"][4:]
        for name, p in runs["fsdp"]["ranks"][rank]["params"].items():
            assert torch.equal(out["params"][name], p), name


@pytest.mark.slow
def test_a_two_rank_checkpoint_loads_at_world_size_one_for_evaluate_once_and_inspect(runs, tmp_path,
                                                                                    python_exe, subprocess_env):
    path = checkpoint.latest_checkpoint(runs["fsdp"]["logdir"])
    expected = runs["fsdp"]["ranks"][0]["params"]
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))
    seen = {}

    def eval_op():
        seen.update({k: v.clone() for k, v in model.state_dict().items()})

    slim.evaluation.evaluate_once(path, str(tmp_path / "eval"), num_evals=1, eval_op=eval_op,
                                  variables_to_restore=model, summary_op=None)
    assert seen.keys() == expected.keys()
    for name, p in expected.items():
        assert torch.equal(seen[name], p), name
    result = subprocess.run([python_exe, "-m", "torchslim", "inspect", path], env=subprocess_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "global step: 12" in result.stdout and "model.0.weight  float32  16x8" in result.stdout


@pytest.mark.slow
def test_a_nan_in_one_ranks_gradient_shard_stops_every_rank(runs):
    log = runs["poisoned"]["log"]
    assert runs["poisoned"]["returncode"] != 0
    # Rank 0's own shard is finite, yet it raises too, naming the parameter and the rank holding the NaN
    # at step 3 (by step 4 every rank's loss is NaN); the save due at step 4 read it first, and wrote nothing.
    for rank in range(2):
        assert f"[rank{rank}]: torchslim.numerics.NumericsError: step 3: NaN or Inf in the gradient shards " \
               "of parameters (rank 1: 0.weight) (read at step 4: the updates from step 3 on were applied" in log, log
    assert sharded_checkpoint.sharded_checkpoints(runs["poisoned"]["logdir"]) == []
