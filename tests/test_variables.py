"""Tests for torchslim.variables, ported from TF-Slim's variables_test scenarios."""
from __future__ import annotations

import hashlib
import io
import logging
import pickle
import struct

import pytest
import torch
from torch import nn

from torchslim import checkpoint, layers, variables


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.bn1 = layers.BatchNorm(2)
        self.conv10 = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2, 3)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


# ------------------------------------------------------------------ queries
class TestQueries:
    def test_model_variables_include_moving_averages(self, net):
        assert list(variables.get_model_variables(net)) == [
            "conv1.weight", "conv1.bias", "bn1.beta", "bn1.moving_mean", "bn1.moving_variance",
            "conv10.weight", "fc.weight", "fc.bias",
        ]
        assert variables.get_model_variables(net)["conv1.weight"] is net.conv1.weight

    def test_trainable_variables(self, net):
        net.fc.bias.requires_grad_(False)
        assert list(variables.get_trainable_variables(net)) == ["conv1.weight", "conv1.bias", "bn1.beta", "conv10.weight", "fc.weight"]
        assert list(variables.get_trainable_variables(net, scope="fc")) == ["fc.weight"]

    def test_scope_and_suffix(self, net):
        # TF's scope is a prefix regex: 'conv1' also matches 'conv10'
        assert list(variables.get_variables(net, scope="conv1")) == ["conv1.weight", "conv1.bias", "conv10.weight"]
        assert list(variables.get_variables(net, scope=r"conv1\.")) == ["conv1.weight", "conv1.bias"]
        assert list(variables.get_model_variables(net, suffix="weight")) == ["conv1.weight", "conv10.weight", "fc.weight"]
        assert list(variables.get_variables_by_suffix(net, "bias", scope="fc")) == ["fc.bias"]

    def test_by_name(self, net):
        assert list(variables.get_variables_by_name(net, "moving_mean")) == ["bn1.moving_mean"]
        assert list(variables.get_variables_by_name(net, "weight", scope="conv")) == ["conv1.weight", "conv10.weight"]
        assert list(variables.get_variables_by_name(net, "eight")) == []

    def test_unique_variable(self, net):
        assert variables.get_unique_variable(net, "fc.bias") is net.fc.bias
        with pytest.raises(ValueError, match="Couldn't find variable 'fc'.*fc.weight"):
            variables.get_unique_variable(net, "fc")

    def test_variables_to_restore_include_exclude(self, net):
        assert list(variables.get_variables_to_restore(net)) == list(variables.get_model_variables(net))
        assert list(variables.get_variables_to_restore(net, include=["fc", "bn1"])) == [
            "fc.weight", "fc.bias", "bn1.beta", "bn1.moving_mean", "bn1.moving_variance"]
        assert list(variables.get_variables_to_restore(net, exclude=["conv", "bn1.moving"])) == ["bn1.beta", "fc.weight", "fc.bias"]
        assert list(variables.get_variables_to_restore(net, include=["conv1"], exclude=["conv10"])) == [
            "conv1.weight", "conv1.bias"]

    def test_variables_to_restore_type_checks(self, net):
        with pytest.raises(TypeError, match="include is provided but is not a list or a tuple"):
            variables.get_variables_to_restore(net, include="fc")
        with pytest.raises(TypeError, match="exclude is provided but is not a list or a tuple"):
            variables.get_variables_to_restore(net, exclude="fc")
        with pytest.raises(TypeError, match="model must be a torch.nn.Module or a dict"):
            variables.get_variables_to_restore([net.fc.weight])

    def test_dict_input_and_filter_variables(self, net):
        vs = variables.get_model_variables(net)
        assert list(variables.get_variables_to_restore(vs, include=["fc"])) == ["fc.weight", "fc.bias"]
        assert list(variables.filter_variables(vs, include_patterns=["conv"], exclude_patterns=["bias", "conv10"])) == ["conv1.weight"]
        assert list(variables.filter_variables(vs, include_patterns=["weight"], reg_search=False)) == []


# -------------------------------------------------------------- checkpoints
def save_plain(path, state):
    torch.save(state, path)
    return str(path)


class TestAssignFromCheckpoint:
    def test_torchslim_checkpoint_roundtrip(self, net, tmp_path):
        saver = checkpoint.Saver(asynchronous=False)
        saver.save(str(tmp_path), {"global_step": 3, "model": net.state_dict()}, global_step=3)
        fresh = Net()
        init_fn = variables.assign_from_checkpoint_fn(str(tmp_path), variables.get_variables_to_restore(fresh))
        assert not torch.equal(fresh.fc.weight, net.fc.weight)
        init_fn()
        for name, value in net.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], value), name

    def test_plain_state_dict_file_with_exclude(self, net, tmp_path):
        path = save_plain(tmp_path / "pretrained.pth", {"state_dict": net.state_dict()})
        fresh = Net()
        fc_before = fresh.fc.weight.detach().clone()
        init_fn = variables.assign_from_checkpoint_fn(path, variables.get_variables_to_restore(fresh, exclude=["fc"]))
        init_fn()
        assert torch.equal(fresh.conv1.weight, net.conv1.weight)
        assert torch.equal(fresh.bn1.moving_variance, net.bn1.moving_variance)
        assert torch.equal(fresh.fc.weight, fc_before)
        assert "fc.weight" not in init_fn.names

    def test_renamed_variables(self, tmp_path):
        # a checkpoint written with TF-style names, mapped onto a torch model
        kernel, bias = torch.randn(2, 3), torch.randn(2)
        path = save_plain(tmp_path / "tf_names.pt", {"dense/kernel": kernel, "dense/bias": bias, "other": torch.ones(1)})
        model = nn.Linear(3, 2)
        var_list = {"dense/kernel": model.weight, "dense/bias": model.bias}
        variables.assign_from_checkpoint_fn(path, var_list)()
        assert torch.equal(model.weight, kernel) and torch.equal(model.bias, bias)
        other = nn.Linear(3, 2)  # list of pairs, one checkpoint tensor into two targets
        variables.assign_from_checkpoint_fn(path, [("dense/bias", [other.bias, model.bias])])()
        assert torch.equal(other.bias, bias)

    def test_missing_variable_raises_naming_it(self, tmp_path):
        path = save_plain(tmp_path / "w.pt", {"a": torch.ones(2)})
        t = torch.zeros(2)
        with pytest.raises(ValueError, match=r"missing variable\(s\) \[b\]"):
            variables.assign_from_checkpoint_fn(path, {"a": t, "b": torch.zeros(1)})

    def test_missing_variable_ignored_with_warning(self, tmp_path, caplog):
        path = save_plain(tmp_path / "w.pt", {"a": torch.ones(2)})
        a, b = torch.zeros(2), torch.zeros(1)
        with caplog.at_level(logging.WARNING, logger="torchslim"):
            init_fn = variables.assign_from_checkpoint_fn(path, {"a": a, "b": b}, ignore_missing_vars=True)
        assert "Variable b missing in checkpoint" in caplog.text
        init_fn()
        assert a.tolist() == [1.0, 1.0] and b.tolist() == [0.0]

    def test_all_missing_ignored_returns_none(self, tmp_path, caplog):
        path = save_plain(tmp_path / "w.pt", {"a": torch.ones(2)})
        with caplog.at_level(logging.WARNING, logger="torchslim"):
            assert variables.assign_from_checkpoint_fn(path, {"x": torch.zeros(1)}, ignore_missing_vars=True) is None
        assert "No Variables to restore" in caplog.text

    def test_shape_mismatch(self, tmp_path):
        path = save_plain(tmp_path / "w.pt", {"w": torch.arange(6.0).reshape(2, 3)})
        target = torch.zeros(3, 2)
        with pytest.raises(ValueError, match=r"'w'.*shape \[2, 3\].*shape \[3, 2\].*reshape_variables"):
            variables.assign_from_checkpoint_fn(path, {"w": target})
        variables.assign_from_checkpoint_fn(path, {"w": target}, reshape_variables=True)()
        assert target.flatten().tolist() == list(range(6))
        with pytest.raises(ValueError, match=r"shape \[2, 3\].*shape \[4\]"):
            variables.assign_from_checkpoint_fn(path, {"w": torch.zeros(4)}, reshape_variables=True)

    def test_casts_dtype(self, tmp_path):
        path = save_plain(tmp_path / "w.pt", {"w": torch.tensor([1.5, 2.5], dtype=torch.float64)})
        target = torch.zeros(2, dtype=torch.float32)
        variables.assign_from_checkpoint_fn(path, {"w": target})()
        assert target.dtype == torch.float32 and target.tolist() == [1.5, 2.5]

    def test_argument_errors(self, tmp_path):
        path = save_plain(tmp_path / "w.pt", {"w": torch.ones(1)})
        with pytest.raises(ValueError, match="var_list cannot be empty"):
            variables.assign_from_checkpoint_fn(path, {})
        with pytest.raises(TypeError, match="tensors carry no names"):
            variables.assign_from_checkpoint_fn(path, [torch.ones(1)])
        with pytest.raises(FileNotFoundError, match="does not exist"):
            variables.assign_from_checkpoint_fn(str(tmp_path / "nope.pt"), {"w": torch.ones(1)})
        with pytest.raises(ValueError, match="no torchslim checkpoint"):
            variables.assign_from_checkpoint_fn(str(tmp_path), {"w": torch.ones(1)})

    def test_list_checkpoint_variables(self, tmp_path):
        path = save_plain(tmp_path / "w.pt", {"model": {"fc": {"weight": torch.ones(2, 3)}}, "step": 4})
        assert variables.list_checkpoint_variables(path) == [("fc.weight", [2, 3])]


class _Evil:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TestRefusesCode:
    def test_torch_save_file_with_code(self, tmp_path):
        marker = tmp_path / "pwned"
        path = tmp_path / "evil.pth"
        torch.save({"w": torch.ones(1), "x": _Evil(str(marker))}, path)
        with pytest.raises(checkpoint.CorruptCheckpointError, match="refused"):
            variables.assign_from_checkpoint_fn(str(path), {"w": torch.zeros(1)})
        assert not marker.exists()

    def test_raw_pickle_with_code(self, tmp_path):
        marker = tmp_path / "pwned"
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps({"w": _Evil(str(marker))}, protocol=2))
        with pytest.raises(checkpoint.CorruptCheckpointError):
            variables.load_checkpoint_variables(str(path))
        assert not marker.exists()

    def test_torchslim_checkpoint_with_valid_digest_and_code(self, tmp_path):
        marker = tmp_path / "pwned"
        buf = io.BytesIO()
        torch.save({"model": {"w": _Evil(str(marker))}}, buf)
        payload = buf.getvalue()
        path = tmp_path / "model.ckpt-1.pt"
        path.write_bytes(struct.pack("<8s32sQ", checkpoint.MAGIC_V1, hashlib.sha256(payload).digest(), len(payload)) + payload)
        with pytest.raises(checkpoint.CorruptCheckpointError, match="refused"):
            variables.assign_from_checkpoint_fn(str(path), {"w": torch.zeros(1)})
        assert not marker.exists()


class TestAssignFromValues:
    def test_assigns_and_reshapes(self, net):
        init_fn = variables.assign_from_values_fn(
            {"fc.bias": [1.0, 2.0, 3.0], "bn1.moving_mean": torch.tensor([[5.0, 6.0]])}, net
        )
        assert net.fc.bias.tolist() != [1.0, 2.0, 3.0]
        init_fn()
        assert net.fc.bias.tolist() == [1.0, 2.0, 3.0]
        assert net.bn1.moving_mean.tolist() == [5.0, 6.0]
        assert init_fn.names == ["fc.bias", "bn1.moving_mean"]

    def test_with_variable_dict(self, net):
        vs = variables.get_trainable_variables(net, scope="fc")
        variables.assign_from_values_fn({"fc.weight": torch.zeros(3, 2)}, vs)()
        assert net.fc.weight.abs().sum().item() == 0

    def test_unknown_name(self, net):
        with pytest.raises(ValueError, match=r"Variable 'weight' wasn't found.*did you mean"):
            variables.assign_from_values_fn({"weight": torch.zeros(1)}, net)

    def test_size_mismatch(self, net):
        with pytest.raises(ValueError, match=r"'fc.bias' has shape \[2\].*shape \[3\]"):
            variables.assign_from_values_fn({"fc.bias": [1.0, 2.0]}, net)


class TestExponentialMovingAverage:
    def test_update_follows_tf_formula_with_num_updates(self):
        w = torch.zeros(3)
        step = [0]

        class Step:  # anything with .value, as a GlobalStep
            @property
            def value(self):
                return step[0]

        ema = variables.ExponentialMovingAverage(0.999, num_updates=Step())
        update = ema.apply({"w": w})
        shadow = 0.0
        for n in range(10):
            w += 1.0  # the variable after update n
            update()
            decay = min(0.999, (1 + n) / (10 + n))  # TF: capped while num_updates is small
            shadow -= (1 - decay) * (shadow - float(w[0]))
            step[0] += 1
        torch.testing.assert_close(ema.average("w"), torch.full((3,), shadow), rtol=0, atol=1e-6)
        assert ema.current_decay() == min(0.999, 11 / 20)

    def test_without_num_updates_the_decay_is_fixed(self):
        w = torch.ones(2)
        ema = variables.ExponentialMovingAverage(0.5)
        update = ema.apply({"w": w})
        w.fill_(3.0)
        update()
        assert ema.average(w).tolist() == [2.0, 2.0]  # 0.5 * 1 + 0.5 * 3

    def test_variables_to_restore_maps_averages_and_keeps_the_rest(self, net):
        ema = variables.ExponentialMovingAverage(0.9)
        ema.apply(net)
        restore = ema.variables_to_restore()
        assert restore["fc.weight/ExponentialMovingAverage"] is net.fc.weight
        assert restore["bn1.moving_mean/ExponentialMovingAverage"] is net.bn1.moving_mean
        bn = nn.BatchNorm1d(2)
        bn_ema = variables.ExponentialMovingAverage(0.9)
        bn_ema.apply(bn)
        assert bn_ema.variables_to_restore()["num_batches_tracked"] is bn.num_batches_tracked  # not float: own name
        only = ema.variables_to_restore([net.fc.weight])
        assert "fc.weight/ExponentialMovingAverage" in only and only["fc.bias"] is net.fc.bias
        assert ema.average_name(net.fc.bias) == "fc.bias/ExponentialMovingAverage"

    def test_state_dict_round_trip_and_errors(self):
        w = torch.ones(2)
        ema = variables.ExponentialMovingAverage(0.9, name="EMA")
        ema.apply({"w": w})
        other = variables.ExponentialMovingAverage(0.9, name="EMA")
        other.apply({"w": torch.zeros(2)})
        other.load_state_dict(ema.state_dict())
        assert other.average("w").tolist() == [1.0, 1.0]
        with pytest.raises(ValueError, match="lack"):
            other.load_state_dict({})
        with pytest.raises(ValueError, match="already has a moving average"):
            ema.apply({"w": w})
        with pytest.raises(ValueError, match="has no moving average"):
            ema.average("v")
        with pytest.raises(ValueError, match="without '/'"):
            variables.ExponentialMovingAverage(0.9, name="a/b")
        with pytest.raises(ValueError, match="decay must be a number"):
            variables.ExponentialMovingAverage(float("nan"))
        with pytest.raises(TypeError, match="only floating point"):
            ema.apply({"count": torch.zeros(2, dtype=torch.long)})

    def test_checkpoint_variables_include_the_averages(self, tmp_path):
        path = str(tmp_path / "model.ckpt-3.pt")
        checkpoint.save_checkpoint(path, {"global_step": 3, "model": {"w": torch.zeros(2)},
                                          "moving_averages": {"ExponentialMovingAverage": {"w": torch.ones(2)}}})
        values = variables.load_checkpoint_variables(path)
        assert values["w"].tolist() == [0.0, 0.0]
        assert values["w/ExponentialMovingAverage"].tolist() == [1.0, 1.0]
        target = torch.full((2,), 5.0)
        variables.assign_from_checkpoint_fn(path, {"w/ExponentialMovingAverage": target})()
        assert target.tolist() == [1.0, 1.0]  # TF's way of loading the averaged weights into a model
