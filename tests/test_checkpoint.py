"""slim.checkpoint: atomic, verified files; the index; max_to_keep; no code execution on load."""
import json
import logging
import os
import pickle
import threading

import pytest
import torch

from torchslim import checkpoint
from torchslim.checkpoint import CorruptCheckpointError, Saver


def _state(step, value=1.0):
    return {"global_step": step, "model": {"w": torch.full((3,), value)}}


def test_save_and_load_round_trip(tmp_path):
    path = str(tmp_path / "model.ckpt-7.pt")
    checkpoint.save_checkpoint(path, {"global_step": 7, "w": torch.arange(4.0), "nested": {"lr": 0.1, "tags": ["a"]}})
    state = checkpoint.load_checkpoint(path)
    assert state["global_step"] == 7
    assert torch.equal(state["w"], torch.arange(4.0))
    assert state["nested"] == {"lr": 0.1, "tags": ["a"]}
    assert os.listdir(tmp_path) == ["model.ckpt-7.pt"]


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(Exception):
        checkpoint.save_checkpoint(str(tmp_path / "model.ckpt-1.pt"), {"fn": lambda: None})  # not picklable
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    real_write = checkpoint._write_payload

    def fail_midway(f, flat):
        real_write(f, flat)  # the whole file, then the disk fills before the fsync and rename
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_payload", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(str(tmp_path / "model.ckpt-1.pt"), _state(1))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:20], "shorter than"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x80]), "digest mismatch"),
        (lambda b: b"NOTSLIM!" + b[8:], "bad magic"),
    ],
)
def test_damaged_files_are_detected(tmp_path, damage, reason):
    path = str(tmp_path / "model.ckpt-1.pt")
    checkpoint.save_checkpoint(path, _state(1))
    data = open(path, "rb").read()
    open(path, "wb").write(damage(data))
    with pytest.raises(CorruptCheckpointError, match=reason) as info:
        checkpoint.load_checkpoint(path)
    assert info.value.path == path


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "model.ckpt-9.pt")
    with pytest.raises(FileNotFoundError, match="model.ckpt-9.pt"):
        checkpoint.load_checkpoint(missing)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "model.ckpt-1.pt")
    # A valid header and digest around a pickle that would create `marker` when unpickled.
    checkpoint.save_checkpoint(path, {"global_step": 1, "payload": _RunsCode(marker)})
    assert not os.path.exists(marker)
    with pytest.raises(CorruptCheckpointError, match="refused to unpickle"):
        checkpoint.load_checkpoint(path)
    assert not os.path.exists(marker)
    # A raw pickle with no header is refused before anything is unpickled.
    raw = str(tmp_path / "model.ckpt-2.pt")
    with open(raw, "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    with pytest.raises(CorruptCheckpointError):
        checkpoint.load_checkpoint(raw)
    assert not os.path.exists(marker)


def test_list_and_latest_ignore_temporaries_and_other_files(tmp_path):
    for step in (10, 2, 100):
        checkpoint.save_checkpoint(str(tmp_path / f"model.ckpt-{step}.pt"), _state(step))
    (tmp_path / ".tmp-model.ckpt-200.pt-abc").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "other.ckpt-5.pt").write_bytes(b"x")
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["model.ckpt-2.pt", "model.ckpt-10.pt", "model.ckpt-100.pt"]
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-100.pt")
    assert checkpoint.latest_checkpoint(str(tmp_path / "missing")) is None
    assert checkpoint.checkpoint_step(names[1]) == 10
    with pytest.raises(ValueError, match="model.ckpt-<step>.pt"):
        checkpoint.checkpoint_step("weights.bin")


def test_saver_keeps_max_to_keep_and_writes_the_index(tmp_path):
    saver = Saver(max_to_keep=2, asynchronous=False)
    for step in (1, 2, 3, 4):
        saver.save(str(tmp_path), _state(step), global_step=step, now=1000.0 + step)
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
    index = checkpoint.read_index(str(tmp_path))
    assert index["latest"] == "model.ckpt-4.pt"
    assert [e["step"] for e in index["recent"]] == [3, 4]


def test_saver_keep_checkpoint_every_n_hours(tmp_path):
    saver = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1.0, asynchronous=False)
    hour = 3600.0
    # steps at t = 0, 0.5h, 1h, 1.5h, 2h, 2.5h: those one hour apart are kept forever.
    for i, step in enumerate(range(1, 7)):
        saver.save(str(tmp_path), _state(step), global_step=step, now=i * hour / 2)
    steps = [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert steps == [3, 5, 6]


def test_a_new_saver_continues_the_directory(tmp_path):
    Saver(max_to_keep=2, asynchronous=False).save(str(tmp_path), _state(1), global_step=1)
    Saver(max_to_keep=2, asynchronous=False).save(str(tmp_path), _state(2), global_step=2)
    (tmp_path / ".tmp-model.ckpt-3.pt-dead").write_bytes(b"half")  # left by a killed process
    Saver(max_to_keep=2, asynchronous=False).save(str(tmp_path), _state(4), global_step=4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "model.ckpt-2.pt", "model.ckpt-4.pt"]


def test_async_saves_are_written_and_errors_surface(tmp_path):
    saver = Saver(max_to_keep=None)
    for step in range(1, 6):
        saver.save_async(str(tmp_path), _state(step), global_step=step)
    saver.wait()
    assert len(checkpoint.list_checkpoints(str(tmp_path))) == 5
    saver.save_async(str(tmp_path), {"fn": lambda: None}, global_step=6)
    with pytest.raises(checkpoint.CheckpointError, match="asynchronous=False"):
        saver.wait()
    saver.close()


def test_restore_latest_skips_a_damaged_newest_with_a_warning(tmp_path, caplog):
    saver = Saver(asynchronous=False)
    for step in (1, 2):
        saver.save(str(tmp_path), _state(step, value=float(step)), global_step=step)
    newest = checkpoint.latest_checkpoint(str(tmp_path))
    with open(newest, "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        path, state = saver.restore_latest(str(tmp_path))
    assert path.endswith("model.ckpt-1.pt") and state["global_step"] == 1
    assert "model.ckpt-2.pt" in caplog.text


def test_restore_model_and_snapshot(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = str(tmp_path / "model.ckpt-5.pt")
    before = net.weight.detach().clone()
    frozen = checkpoint.snapshot({"global_step": 5, "model": net.state_dict()})
    with torch.no_grad():
        net.weight.add_(1.0)  # changes after the snapshot do not reach it
    checkpoint.save_checkpoint(path, frozen)
    other = torch.nn.Linear(3, 2)
    assert checkpoint.restore_model(path, other) == 5
    assert torch.equal(other.weight, before)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        checkpoint.restore_model(path, "not a model")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_to_keep": -1}, "max_to_keep"),
        ({"keep_checkpoint_every_n_hours": 0}, "keep_checkpoint_every_n_hours"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_saver_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Saver(**kwargs)


def test_save_rejects_bad_arguments_before_writing(tmp_path):
    saver = Saver()
    with pytest.raises(ValueError, match="global_step"):
        saver.save(str(tmp_path / "d"), _state(1), global_step=-1)
    with pytest.raises(TypeError, match="state must be a mapping"):
        saver.save(str(tmp_path / "d"), [1, 2], global_step=1)
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------- format 2
def test_round_trip_keeps_dtypes_views_shared_storage_and_module_metadata(tmp_path):
    base = torch.arange(24.0)
    bn = torch.nn.BatchNorm1d(3).state_dict()
    state = {
        "global_step": 9,
        "tied": [base, base],                                   # one storage, written once, shared again
        "view": base[4:16].view(3, 4).t(),                       # offset and strides
        "dtypes": {d: torch.ones(3, dtype=d) for d in (torch.bfloat16, torch.bool, torch.int64, torch.complex64)},
        "scalar": torch.tensor(2.5), "empty": torch.empty(0, 5),
        "sparse": torch.eye(3).to_sparse(), "param": torch.nn.Parameter(torch.ones(2)),  # left to torch.save
        "bn": bn, "tuple": (1, "a", torch.zeros(2)),
    }
    path = str(tmp_path / "model.ckpt-9.pt")
    checkpoint.save_checkpoint(path, state)
    got = checkpoint.load_checkpoint(path)
    assert got.path == path and checkpoint.stored_step(path) == 9
    assert got["tied"][0].untyped_storage().data_ptr() == got["tied"][1].untyped_storage().data_ptr()
    assert torch.equal(got["view"], state["view"]) and got["view"].stride() == state["view"].stride()
    for d, t in got["dtypes"].items():
        assert t.dtype == d and torch.equal(t, state["dtypes"][d])
    assert got["scalar"].shape == () and got["empty"].shape == (0, 5)
    assert torch.equal(got["sparse"].to_dense(), torch.eye(3)) and isinstance(got["param"], torch.nn.Parameter)
    assert got["bn"]._metadata == bn._metadata and torch.equal(got["bn"]["running_var"], bn["running_var"])
    assert got["tuple"][:2] == (1, "a") and torch.equal(got["tuple"][2], torch.zeros(2))


def test_map_location(tmp_path):
    path = str(tmp_path / "model.ckpt-1.pt")
    checkpoint.save_checkpoint(path, {"w": torch.ones(2)})
    assert checkpoint.load_checkpoint(path, map_location=None)["w"].device.type == "cpu"
    assert checkpoint.load_checkpoint(path, map_location={"cpu": "cpu"})["w"].device.type == "cpu"
    with pytest.raises(TypeError, match="map_location"):
        checkpoint.load_checkpoint(path, map_location=lambda s, loc: s)


def test_a_format_1_file_is_still_read_and_verified(tmp_path):
    import hashlib
    import io
    import struct

    buf = io.BytesIO()
    torch.save({"global_step": 4, "w": torch.arange(3.0)}, buf)
    payload = buf.getvalue()
    path = tmp_path / "model.ckpt-4.pt"
    path.write_bytes(struct.pack("<8s32sQ", checkpoint.MAGIC_V1, hashlib.sha256(payload).digest(), len(payload)) + payload)
    assert torch.equal(checkpoint.load_checkpoint(str(path))["w"], torch.arange(3.0))
    checkpoint.verify_checkpoint(str(path))
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    with pytest.raises(CorruptCheckpointError, match="sha256 digest mismatch"):
        checkpoint.load_checkpoint(str(path))


@pytest.mark.parametrize("where", ["step in the header", "manifest", "skeleton", "tensor data"])
def test_a_flipped_byte_anywhere_is_refused_before_unpickling(tmp_path, where):
    path = str(tmp_path / "model.ckpt-1.pt")
    checkpoint.save_checkpoint(path, {"global_step": 1, "model": {"w": torch.arange(1000.0)}})
    data = bytearray(open(path, "rb").read())
    _, _, _, _, m, s, _ = checkpoint._format.HEADER.unpack_from(data)
    h = checkpoint._format.HEADER.size
    offset = {"step in the header": 16, "manifest": h + m // 2, "skeleton": h + m + s // 2,
              "tensor data": len(data) - 7}[where]
    data[offset] ^= 0x04
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="digest mismatch|manifest"):
        checkpoint.load_checkpoint(path)
    with pytest.raises(CorruptCheckpointError):
        checkpoint.verify_checkpoint(path)


def test_inspect_reports_the_digest(tmp_path, capsys):
    path = str(tmp_path / "model.ckpt-2.pt")
    checkpoint.save_checkpoint(path, _state(2))
    assert checkpoint.inspect_main([path]) == 0
    out = capsys.readouterr().out
    assert "integrity: ok (crc32c verified)" in out and "global step: 2" in out


# ----------------------------------------------------------------- background saves
class _HeldWorker:
    """Holds the saver's background thread before it copies the state, until released."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        real = checkpoint._format.release_staging

        def held(flat):
            assert self.release.wait(30)
            real(flat)

        monkeypatch.setattr(checkpoint._format, "release_staging", held)


def _big_model():
    model = torch.nn.Linear(1024, 512)  # a 2 MiB weight: copied off the training thread
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    return model, optimizer


def test_a_background_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path, monkeypatch):
    model, optimizer = _big_model()
    before = model.weight.detach().clone()
    held = _HeldWorker(monkeypatch)
    saver = Saver()
    try:
        saver.save_async(str(tmp_path), {"global_step": 1, "model": model.state_dict()}, global_step=1)
        stepped = threading.Thread(target=optimizer.step)  # the next training step
        stepped.start()
        stepped.join(0.5)
        assert stepped.is_alive(), "optimizer.step must wait until the copy of the weights is taken"
        saver.raise_if_failed()  # non-blocking while the save is in flight
        held.release.set()
        stepped.join(30)
        saver.wait()
    finally:
        held.release.set()
        saver.close()
    assert torch.equal(model.weight.detach(), before - 0.5)  # the step did run
    saved = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path)))
    assert torch.equal(saved["model"]["weight"], before)


def test_a_tensor_changed_in_place_outside_optimizer_step_fails_that_save(tmp_path, monkeypatch):
    model, _ = _big_model()
    held = _HeldWorker(monkeypatch)
    saver = Saver()
    try:
        saver.save_async(str(tmp_path), {"global_step": 1, "model": model.state_dict()}, global_step=1)
        with torch.no_grad():
            model.weight.add_(1.0)  # not through an optimizer: the barrier cannot see it
        held.release.set()
        saver._jobs.join()
        with pytest.raises(checkpoint.CheckpointError, match="changed in place") as info:
            saver.raise_if_failed()
        assert info.value.path.endswith("model.ckpt-1.pt")
        assert checkpoint.list_checkpoints(str(tmp_path)) == []
    finally:
        held.release.set()
        saver.close()


def test_a_failed_background_save_names_the_file_and_the_os_error(tmp_path, monkeypatch):
    import shutil

    logdir = tmp_path / "logdir"
    held = _HeldWorker(monkeypatch)
    saver = Saver()
    try:
        saver.save_async(str(logdir), _state(3), global_step=3)
        shutil.rmtree(logdir)  # the directory vanishes under the writer: a real OS error
        held.release.set()
        saver._jobs.join()
        with pytest.raises(checkpoint.CheckpointError) as info:
            saver.raise_if_failed()
        message = str(info.value)
        assert "model.ckpt-3.pt" in message and "FileNotFoundError" in message and "No such file" in message
        saver.raise_if_failed()  # raised once
    finally:
        held.release.set()
        saver.close()


def test_a_background_save_from_a_snapshot_is_written_as_it_is(tmp_path):
    model, _ = _big_model()
    saver = Saver()
    frozen = checkpoint.snapshot({"global_step": 2, "model": model.state_dict()})
    saver.save_async(str(tmp_path), frozen, global_step=2)
    saver.close()
    saved = checkpoint.load_checkpoint(str(tmp_path / "model.ckpt-2.pt"))
    assert torch.equal(saved["model"]["weight"], model.weight.detach())


# ----------------------------------------------------------------- the index heals itself
def _damage_index(logdir, kind):
    index = logdir / "checkpoint.json"
    if kind == "directory":
        index.unlink()
        index.mkdir()
        (index / "x").write_text("y")
    elif kind == "garbage bytes":
        index.write_bytes(b"\x00\xff\x17 not json \x80")
    else:
        index.write_text(json.dumps(kind))


@pytest.mark.parametrize("kind", [
    {"recent": "abc"},
    {"recent": [], "kept": [{"file": "model.ckpt-1.pt", "time": 0.0}]},   # a kept entry without 'step'
    {"recent": [{"file": 5, "step": 1, "time": 0.0}]},
    {"recent": [], "last_preserved_time": "yesterday"},
    [1, 2, 3],
    "directory",
    "garbage bytes",
], ids=["recent-abc", "kept-without-step", "file-not-a-name", "bad-time", "a-list", "directory", "garbage-bytes"])
def test_a_malformed_index_is_rebuilt_from_the_files_with_one_warning(tmp_path, caplog, kind):
    for step in (1, 2):
        Saver(asynchronous=False).save(str(tmp_path), _state(step, float(step)), global_step=step)
    _damage_index(tmp_path, kind)
    restarted = Saver(max_to_keep=2, asynchronous=False)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        path, state = restarted.restore_latest(str(tmp_path))
        assert state["global_step"] == 2 and path.endswith("model.ckpt-2.pt")
        restarted.save(str(tmp_path), _state(3), global_step=3)
        restarted.save(str(tmp_path), _state(4), global_step=4)
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1 and "rebuilt it from the 2 checkpoint files" in warnings[0]
    index = checkpoint.read_index(str(tmp_path))
    assert index["prefix"] == "model.ckpt" and [e["step"] for e in index["recent"]] == [3, 4]
    assert [checkpoint.checkpoint_step(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == [3, 4]
    if kind == "directory":
        assert [n for n in os.listdir(tmp_path) if n.startswith("checkpoint.json.damaged-")]


def test_train_restarts_past_a_malformed_index(tmp_path, caplog):
    import torchslim as slim

    def run(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        x, y = torch.randn(8, 2), torch.randn(8, 1)
        op = slim.learning.create_train_op(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                                           torch.optim.SGD(model.parameters(), lr=0.1))
        slim.learning.train(op, str(tmp_path), data=[(x, y)] * 100, number_of_steps=steps, log_every_n_steps=0,
                            save_summaries_secs=None, save_interval_secs=None)
        return op.step

    assert run(3) == 3
    _damage_index(tmp_path, {"recent": "abc"})
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        assert run(5) == 5
    assert any("malformed" in r.getMessage() for r in caplog.records)
    assert checkpoint.stored_step(checkpoint.latest_checkpoint(str(tmp_path))) == 5


def test_a_renamed_checkpoint_is_reported_and_ordered_by_its_stored_step(tmp_path, caplog):
    for step in (10, 20):
        Saver(asynchronous=False).save(str(tmp_path), _state(step, float(step)), global_step=step)
    os.rename(tmp_path / "model.ckpt-20.pt", tmp_path / "model.ckpt-500.pt")
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        path, state = Saver().restore_latest(str(tmp_path))
    assert path.endswith("model.ckpt-500.pt") and state["global_step"] == 20
    assert any("model.ckpt-500.pt holds global step 20 although its name says 500" in r.getMessage()
               for r in caplog.records)
    # The restarted run trains on from step 20 and saves step 30: that is the newest, not "500".
    Saver(asynchronous=False).save(str(tmp_path), _state(30, 30.0), global_step=30)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["model.ckpt-10.pt", "model.ckpt-500.pt", "model.ckpt-30.pt"]
    assert Saver().restore_latest(str(tmp_path))[1]["global_step"] == 30


# ----------------------------------------------------------------- prefixes
def test_a_saver_prefix_is_recorded_and_found_by_the_readers(tmp_path):
    saver = Saver(prefix="chkpt", asynchronous=False)
    for step in (5, 7):
        saver.save(str(tmp_path), _state(step), global_step=step)
    assert checkpoint.read_index(str(tmp_path))["prefix"] == "chkpt"
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("chkpt-7.pt")
    assert checkpoint.latest_checkpoint(str(tmp_path), prefix="model.ckpt") is None
    os.unlink(tmp_path / "checkpoint.json")  # without the index: any torchslim checkpoint, whatever its prefix
    (tmp_path / "notes-3.pt").write_bytes(b"not a checkpoint")
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == ["chkpt-5.pt", "chkpt-7.pt"]


# ----------------------------------------------------------------- another model's checkpoint
def test_another_models_checkpoint_names_the_file_the_parameter_and_the_fix(tmp_path):
    import torchslim as slim

    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    Saver(asynchronous=False).save(str(tmp_path), {"global_step": 5, "model": other.state_dict(),
                                                   "optimizer": {}}, global_step=5)
    mine = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 1))
    op = slim.learning.create_train_op(lambda b: mine(b).sum(), torch.optim.SGD(mine.parameters(), lr=0.1))
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        slim.learning.train(op, str(tmp_path), data=[torch.ones(2, 4)], number_of_steps=6, log_every_n_steps=0,
                            save_summaries_secs=None)
    message = str(info.value)
    assert "model.ckpt-5.pt" in message and "'0.weight' has shape (3, 4) in the checkpoint and (6, 4)" in message
    assert "3 entries differ" in message and "Fix:" in message and "assign_from_checkpoint_fn" in message
    checkpoint.save_checkpoint(str(tmp_path / "model.ckpt-9.pt"), {"global_step": 9, "weights": torch.ones(1)})
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model.ckpt-9.pt' has no 'model' state dict"):
        checkpoint.restore_model(str(tmp_path / "model.ckpt-9.pt"), mine)
    wrapped = {"global_step": 1, "model": {f"module.{k}": v for k, v in mine.state_dict().items()}}
    with pytest.raises(checkpoint.CheckpointMismatchError, match="saved from a wrapped model"):
        checkpoint.load_model_state(mine, wrapped)
