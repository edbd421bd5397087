"""slim.checkpoint: atomic, verified files; the index; max_to_keep; no code execution on load."""
import logging
import os
import pickle

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
