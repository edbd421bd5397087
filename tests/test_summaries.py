"""Tests for torchslim.summaries: written with TensorBoard's writer, read back with its reader."""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import re
import threading

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchslim import collections, event_file, summaries, summary_writer
from torchslim.collections import GraphKeys


def read_events(logdir: str) -> EventAccumulator:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def decode_png(data: bytes) -> np.ndarray:
    Image = pytest.importorskip("PIL.Image")
    return np.asarray(Image.open(io.BytesIO(data)))


# ------------------------------------------------------------- TF-Slim's summaries_test, ported
@pytest.mark.parametrize("print_summary", [False, True])
def test_scalar_summary_is_part_of_collection(print_summary):
    tensor = torch.ones([]) * 3
    record = summaries.add_scalar_summary(tensor, "my_score", "eval", print_summary=print_summary)
    assert any(r is record for r in collections.get_collection(GraphKeys.SUMMARIES))
    assert record.tag == "eval/my_score"


@pytest.mark.parametrize("print_summary", [False, True])
def test_scalar_summary_is_written(tmp_path, print_summary, caplog):
    value = 3
    tensor = torch.ones([]) * value
    summaries.add_scalar_summary(tensor, "my_score", "eval", print_summary)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        with summaries.SummaryWriter(str(tmp_path)) as writer:
            writer.write(1)
    # One event file, holding the value under prefix/name.
    assert len(glob.glob(os.path.join(str(tmp_path), "*"))) == 1
    assert scalar_series(read_events(str(tmp_path)), "eval/my_score") == [(1, pytest.approx(value))]
    printed = [r.getMessage() for r in caplog.records if r.name == "torchslim"]
    assert printed == (["eval/my_score: 3.0"] if print_summary else [])


def test_scalar_summary_scope_filters_by_tag():
    summaries.add_scalar_summary(torch.tensor(1.0), "a", prefix="eval")
    summaries.add_scalar_summary(torch.tensor(2.0), "b", prefix="train")
    assert [r.tag for r in collections.get_collection(GraphKeys.SUMMARIES, scope="eval")] == ["eval/a"]


# ----------------------------------------------------------------------- names
def test_names_are_composed_as_tf_slim_composes_them():
    t = torch.zeros(2, 2)
    assert summaries.add_scalar_summary(torch.tensor(1.0), "loss").tag == "loss"
    assert summaries.add_scalar_summary(torch.tensor(1.0), "loss", prefix="eval").tag == "eval/loss"
    assert summaries.add_scalar_summary(torch.tensor(1.0), "loss", prefix="").tag == "loss"
    assert summaries.add_histogram_summary(t, "w", prefix="p").tag == "p/w"
    assert summaries.add_zero_fraction_summary(t, "relu").tag == "relu/Fraction_of_Zero_Values"
    assert summaries.add_zero_fraction_summary(t, "relu", "sp").tag == "sp/relu/Fraction_of_Zero_Values"
    assert summaries.add_image_summary(torch.zeros(1, 5, 5, 3), "img", "in").tag == "in/img"


def test_plural_forms_take_modules_pairs_dicts_and_lists():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    tags = [r.tag for r in summaries.add_histogram_summaries(net, prefix="weights")]
    assert tags == ["weights/0.weight", "weights/0.bias", "weights/2.weight", "weights/2.bias"]
    tags = [r.tag for r in summaries.add_zero_fraction_summaries(net.named_parameters())]
    assert tags == [f"{n}/Fraction_of_Zero_Values" for n, _ in net.named_parameters()]
    tags = [r.tag for r in summaries.add_scalar_summaries({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, "s")]
    assert tags == ["s/a", "s/b"]
    tags = [r.tag for r in summaries.add_image_summaries([("x", torch.rand(2, 3, 6, 6))])]
    assert tags == ["x"]
    assert len(collections.get_collection(GraphKeys.SUMMARIES)) == 4 + 4 + 2 + 1


def test_unnamed_parameter_takes_its_name_from_registered_model():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    collections.add_to_collection(GraphKeys.MODEL_VARIABLES, net)
    assert summaries.add_histogram_summary(net[1].weight).tag == "1.weight"
    assert summaries.add_histogram_summary(net[0].bias.data, prefix="p").tag == "p/0.bias"  # same memory
    tags = [r.tag for r in summaries.add_histogram_summaries([net[0].weight, net[1].bias])]
    assert tags == ["0.weight", "1.bias"]
    assert summaries.add_zero_fraction_summary(net[0].weight).tag == "0.weight/Fraction_of_Zero_Values"


def test_unnamed_tensor_asks_for_a_name():
    with pytest.raises(ValueError, match="argument 'name' is required"):
        summaries.add_scalar_summary(torch.tensor(1.0))
    other = torch.nn.Linear(2, 2)  # not registered
    with pytest.raises(ValueError, match="name"):
        summaries.add_histogram_summaries([other.weight])
    assert collections.get_collection(GraphKeys.SUMMARIES) == []


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: summaries.add_scalar_summary(3.0, "x"), "argument 'tensor' must be a torch.Tensor"),
        (lambda: summaries.add_histogram_summary([1, 2], "x"), "argument 'tensor' must be a torch.Tensor"),
        (lambda: summaries.add_scalar_summary(torch.tensor(1.0), ""), "argument 'name' must be a non-empty string"),
        (lambda: summaries.add_histogram_summary(torch.ones(2), name=""), "argument 'name'"),
        (lambda: summaries.add_scalar_summary(torch.tensor(1.0), 5), "argument 'name' must be a string"),
        (lambda: summaries.add_scalar_summary(torch.tensor(1.0), "x", prefix=3), "argument 'prefix'"),
        (lambda: summaries.add_scalar_summary(torch.ones(3), "x"), r"exactly one value .* shape \(3,\)"),
        (lambda: summaries.add_histogram_summary(torch.ones(0), "x"), "no element"),
        (lambda: summaries.add_histogram_summary(torch.ones(2, dtype=torch.complex64), "x"), "must be real"),
        (lambda: summaries.add_image_summary(torch.rand(8, 8, 3), "x"), r"rank 4 .* got rank 3"),
        (lambda: summaries.add_image_summary(torch.rand(2, 5, 8, 8), "x"), "channel dimension of size 1, 3 or 4"),
        (lambda: summaries.add_image_summary(torch.rand(2, 8, 8, 3), "x", data_format="NCHW"), "8 channels"),
        (lambda: summaries.add_image_summary(torch.rand(2, 3, 8, 4), "x"), "could be NHWC or NCHW"),
        (lambda: summaries.add_image_summary(torch.rand(2, 3, 8, 3), "x"), "could be NHWC or NCHW"),
        (lambda: summaries.add_image_summary(torch.rand(2, 3, 8, 4), "x", data_format="HWC"), "data_format"),
        (lambda: summaries.add_image_summary(torch.ones(2, 8, 8, 3, dtype=torch.int32), "x"), "uint8 or floating"),
        (lambda: summaries.add_image_summary(torch.ones(0, 8, 8, 3), "x"), "no image"),
        (lambda: summaries.add_histogram_summaries(torch.ones(3)), "got a single tensor"),
        (lambda: summaries.add_histogram_summaries("weights"), "argument 'tensors'"),
        (lambda: summaries.add_histogram_summaries([("w", torch.ones(2)), 7]), "item 1 of argument 'tensors'"),
        (lambda: summaries.add_gradient_summaries([(torch.ones(1), "w")]), "item 0 of argument 'named_grads'"),
        (lambda: summaries.add_gradient_summaries(torch.ones(2)), "argument 'named_grads'"),
    ],
)
def test_bad_input_is_rejected_before_recording(call, match):
    with pytest.raises(ValueError, match=match):
        call()
    assert collections.get_collection(GraphKeys.SUMMARIES) == []


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="argument 'logdir'"):
        summaries.SummaryWriter("")
    with pytest.raises(ValueError, match="argument 'purge_step'"):
        summaries.SummaryWriter(str(tmp_path), purge_step=-1)
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="argument 'step'"):
            writer.write(-1)
        with pytest.raises(ValueError, match="argument 'step'"):
            writer.write(1.5)
        with pytest.raises(ValueError, match="argument 'records' must be a list"):
            writer.write(1, records=summaries.add_scalar_summary(torch.tensor(1.0), "x"))
        with pytest.raises(ValueError, match="item 0 must be a SummaryRecord"):
            writer.write(1, records=["loss"])
        with pytest.raises(ValueError, match="argument 'value'"):
            writer.add_scalar("x", "1.0", 1)
        with pytest.raises(ValueError, match="argument 'value'"):
            writer.add_scalar("x", torch.ones(2), 1)
        with pytest.raises(ValueError, match="argument 'tag'"):
            writer.add_scalar("", 1.0, 1)
    with pytest.raises(ValueError, match="is closed"):
        writer.write(2)


# ------------------------------------------------------- round trip through TensorBoard's reader
@pytest.mark.parametrize("asynchronous", [True, False])
def test_every_kind_reads_back_with_exact_values(tmp_path, asynchronous):
    logdir = str(tmp_path)
    torch.manual_seed(0)
    weights = torch.randn(7, 5)
    sparse = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0])  # 4 zeros of 7
    images_nhwc = torch.rand(4, 6, 9, 3)  # 4 images: only the first 3 are written, as TF does
    gray_u8 = torch.randint(0, 256, (1, 1, 5, 7), dtype=torch.uint8)  # NCHW, one channel
    summaries.add_scalar_summary(torch.tensor(2.5), "lr")
    summaries.add_histogram_summary(weights, "w", prefix="model")
    summaries.add_zero_fraction_summary(sparse, "act")
    summaries.add_image_summary(images_nhwc, "rgb")
    summaries.add_image_summary(gray_u8, "gray")
    with summaries.SummaryWriter(logdir, asynchronous=asynchronous) as writer:
        writer.write(step=7)
        writer.add_scalar("global_step/sec", 12.5, 7)
        writer.add_scalar("loss_tensor", torch.tensor(0.25), 7)

    acc = read_events(logdir)
    assert scalar_series(acc, "lr") == [(7, 2.5)]
    assert scalar_series(acc, "global_step/sec") == [(7, 12.5)]
    assert scalar_series(acc, "loss_tensor") == [(7, 0.25)]
    assert scalar_series(acc, "act/Fraction_of_Zero_Values") == [(7, pytest.approx(4 / 7))]
    (h,) = acc.Histograms("model/w")
    assert h.step == 7
    assert h.histogram_value.num == weights.numel()
    assert h.histogram_value.min == pytest.approx(weights.min().item())
    assert h.histogram_value.max == pytest.approx(weights.max().item())
    assert h.histogram_value.sum == pytest.approx(weights.sum().item(), abs=1e-5)
    assert sum(h.histogram_value.bucket) == weights.numel()
    assert sorted(acc.Tags()["images"]) == ["gray/image/0", "rgb/image/0", "rgb/image/1", "rgb/image/2"]
    for i in range(3):
        (img,) = acc.Images(f"rgb/image/{i}")
        assert (img.step, img.width, img.height) == (7, 9, 6)
        expected = (images_nhwc[i] * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(decode_png(img.encoded_image_string), expected)
    (img,) = acc.Images("gray/image/0")
    assert (img.width, img.height) == (7, 5)
    np.testing.assert_array_equal(decode_png(img.encoded_image_string), gray_u8[0, 0].numpy())


def test_nchw_and_nhwc_float_and_uint8_write_the_same_image():
    nhwc = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    records = [
        summaries.add_image_summary(nhwc, "a"),
        summaries.add_image_summary(nhwc.permute(0, 3, 1, 2), "b"),
        summaries.add_image_summary(nhwc.float() / 255, "c"),
        summaries.add_image_summary(nhwc.permute(0, 3, 1, 2).double() / 255, "d", data_format="NCHW"),
    ]
    values = [v for _, kind, v in summaries.evaluate_summaries(records)]
    for v in values:
        np.testing.assert_array_equal(v, nhwc.numpy())


def test_float_images_outside_unit_range_are_clipped():
    (rec,) = [summaries.add_image_summary(torch.tensor([-1.0, 0.5, 2.0]).reshape(1, 1, 3, 1), "x", data_format="NHWC")]
    (_, _, v), = summaries.evaluate_summaries([rec])
    assert v.reshape(-1).tolist() == [0, 128, 255]


def test_evaluate_summaries_defaults_to_the_collection():
    summaries.add_scalar_summary(torch.tensor(1.5), "a")
    summaries.add_zero_fraction_summary(torch.tensor([0, 0, 1, 0]), "z")
    summaries.add_histogram_summary(torch.arange(6).reshape(2, 3), "h")
    (a, z, h) = summaries.evaluate_summaries()
    assert a == ("a", "scalar", 1.5)
    assert z == ("z/Fraction_of_Zero_Values", "scalar", 0.75)
    assert h[:2] == ("h", "histogram") and h[2].tolist() == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------ semantics
def test_setup_summary_follows_the_live_tensor(tmp_path):
    """A histogram added once at set-up shows the parameter's value at each write."""
    net = torch.nn.Linear(4, 3)
    summaries.add_histogram_summaries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 4):
            with torch.no_grad():
                net.weight.fill_(float(step))  # in place, as an optimizer updates
            opt.zero_grad()
            net(torch.ones(2, 4)).sum().backward()
            opt.step()  # bias changes by -0.5 * 2 each step
            writer.write(step)
            expected_bias_sum = net.bias.sum().item()
            writer.flush()
            bias_hist = read_events(str(tmp_path)).Histograms("bias")[-1]
            assert bias_hist.step == step
            assert bias_hist.histogram_value.sum == pytest.approx(expected_bias_sum, abs=1e-5)
    hist = read_events(str(tmp_path)).Histograms("weight")
    assert [(h.step, h.histogram_value.min, h.histogram_value.max) for h in hist] == [
        (1, 1.0 - 1.0, 1.0 - 1.0),  # weight filled with 1, then SGD: 1 - 0.5 * 2 = 0
        (2, 1.0, 1.0),
        (3, 2.0, 2.0),
    ]


def test_step_summary_records_that_steps_value(tmp_path):
    """A summary added inside total_loss (inside the step scope) writes that step's value."""
    losses = {}
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 6):
            with collections.step_scope():
                loss = torch.tensor(float(step) ** 2)
                summaries.add_scalar_summary(loss, "total_loss")
                losses[step] = loss.item()
                if step % 2 == 1:
                    writer.write(step)
            assert collections.get_collection(GraphKeys.SUMMARIES) == []
    assert scalar_series(read_events(str(tmp_path)), "total_loss") == [(1, 1.0), (3, 9.0), (5, 25.0)]


def test_recording_keeps_the_tensor_itself_and_copies_nothing():
    p = torch.nn.Parameter(torch.randn(16))
    y = p * 2
    rec = summaries.add_histogram_summary(y, "y")
    assert rec.tensor is y  # no copy, no detach on the step: both happen only when it is written
    assert rec.tensor.data_ptr() == y.data_ptr()
    rec = summaries.add_scalar_summary(p[0], "p0")
    assert rec.tensor.data_ptr() == p.data_ptr()


def test_write_snapshots_values_at_call_time(tmp_path):
    """Values are read when write() is called, not later in the background thread."""
    t = torch.zeros(100)
    summaries.add_histogram_summary(t, "t")
    summaries.add_scalar_summary(t[0], "t0")
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 21):
            t.fill_(float(step))
            writer.write(step)
    acc = read_events(str(tmp_path))
    assert scalar_series(acc, "t0") == [(s, float(s)) for s in range(1, 21)]
    assert [(h.step, h.histogram_value.min, h.histogram_value.max) for h in acc.Histograms("t")] == [
        (s, float(s), float(s)) for s in range(1, 21)
    ]


def test_print_summary_logs_when_written_not_when_recorded(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="torchslim"):
        summaries.add_scalar_summary(torch.tensor(0.5), "acc", print_summary=True)
        summaries.add_zero_fraction_summary(torch.tensor([0.0, 1.0]), "z", print_summary=True)
        summaries.add_image_summary(torch.zeros(1, 2, 2, 1), "img", print_summary=True)
        summaries.add_scalar_summary(torch.tensor(9.0), "quiet")
        assert [r for r in caplog.records if r.name == "torchslim"] == []
        with summaries.SummaryWriter(str(tmp_path), asynchronous=False) as writer:
            writer.write(3)
    messages = [r.getMessage() for r in caplog.records if r.name == "torchslim"]
    assert messages[:2] == ["acc: 0.5", "z/Fraction_of_Zero_Values: 0.5"]
    assert messages[2].startswith("img: uint8 images of shape [1, 2, 2, 1]")
    assert len(messages) == 3


def test_gradient_summaries_tags_and_values(tmp_path, caplog):
    net = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2))
    net(torch.arange(6.0).reshape(2, 3)).pow(2).sum().backward()
    with caplog.at_level(logging.INFO, logger="torchslim"), collections.step_scope():
        named = [(n, p.grad) for n, p in net.named_parameters()] + [("frozen", frozen.grad)]
        records = summaries.add_gradient_summaries(named)
        with summaries.SummaryWriter(str(tmp_path)) as writer:
            writer.write(4)
    assert [r.tag for r in records] == [
        "weight/gradient", "weight/gradient_norm", "bias/gradient", "bias/gradient_norm"
    ]
    assert "Var frozen has no gradient" in [r.getMessage() for r in caplog.records]
    acc = read_events(str(tmp_path))
    for name, p in net.named_parameters():
        assert scalar_series(acc, f"{name}/gradient_norm") == [(4, pytest.approx(p.grad.norm().item(), rel=1e-6))]
        (h,) = acc.Histograms(f"{name}/gradient")
        assert h.histogram_value.num == p.grad.numel()


# ------------------------------------------------------------------- writer behaviour
def test_background_error_is_raised_at_next_call_and_says_how_to_debug(tmp_path):
    bad = torch.tensor([1.0, float("nan")])
    rec = summaries.add_histogram_summary(bad, "bad")
    writer = summaries.SummaryWriter(str(tmp_path))
    writer.write(1, records=[rec])  # fails in the background thread
    with pytest.raises(summaries.SummaryWriterError, match="asynchronous=False") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, ValueError) and "'bad'" in str(info.value)
    # The writer keeps working after the error was reported.
    writer.add_scalar("ok", 1.0, 2)
    writer.close()
    assert scalar_series(read_events(str(tmp_path)), "ok") == [(2, 1.0)]


def test_synchronous_writer_raises_on_the_calling_thread(tmp_path):
    rec = summaries.add_histogram_summary(torch.tensor([float("inf")]), "bad")
    with summaries.SummaryWriter(str(tmp_path), asynchronous=False) as writer:
        with pytest.raises(ValueError, match="'bad'.*NaN or infinite"):
            writer.write(1, records=[rec])


def test_background_error_surfaces_at_close(tmp_path):
    rec = summaries.add_histogram_summary(torch.tensor([float("nan")]), "bad")
    writer = summaries.SummaryWriter(str(tmp_path))
    writer.write(1, records=[rec])
    with pytest.raises(summaries.SummaryWriterError):
        writer.close()
    writer.close()  # idempotent


def test_flush_makes_events_readable_while_open(tmp_path):
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("x", 1.0, 1)
        writer.flush()
        assert scalar_series(read_events(str(tmp_path)), "x") == [(1, 1.0)]


def test_writing_runs_on_a_background_thread(tmp_path):
    seen = []
    summaries.add_scalar_summary(torch.tensor(1.0), "x")

    class Probe(logging.Handler):
        def emit(self, record):
            seen.append(threading.current_thread().name)

    handler = Probe()
    log = logging.getLogger("torchslim")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        summaries.add_scalar_summary(torch.tensor(2.0), "printed", print_summary=True)
        with summaries.SummaryWriter(str(tmp_path)) as writer:
            writer.write(1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    assert len(seen) == 1 and seen[0].startswith("torchslim-summary-writer")


def test_resumed_writer_purges_rewound_steps(tmp_path):
    """Run 1 writes steps 1..10, checkpoints at 5 and dies; run 2 resumes at 6 in the same logdir."""
    logdir = str(tmp_path)
    with summaries.SummaryWriter(logdir) as writer:
        for step in range(1, 11):
            writer.add_scalar("loss", 100.0 + step, step)
            writer.write(step, records=[summaries.add_histogram_summary(torch.full((3,), float(step)), "h")])
    with summaries.SummaryWriter(logdir, purge_step=6) as writer:
        for step in range(6, 13):
            writer.add_scalar("loss", 200.0 + step, step)
            writer.write(step, records=[summaries.add_histogram_summary(torch.full((3,), -float(step)), "h")])
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2
    acc = read_events(logdir)
    assert scalar_series(acc, "loss") == [(s, 100.0 + s) for s in range(1, 6)] + [(s, 200.0 + s) for s in range(6, 13)]
    assert [(h.step, h.histogram_value.min) for h in acc.Histograms("h")] == (
        [(s, float(s)) for s in range(1, 6)] + [(s, -float(s)) for s in range(6, 13)]
    )


def test_writer_is_usable_from_several_threads(tmp_path):
    with summaries.SummaryWriter(str(tmp_path), max_pending=2) as writer:
        def work(offset):
            for i in range(25):
                writer.add_scalar(f"t{offset}", float(i), i)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    acc = read_events(str(tmp_path))
    for k in range(4):
        assert scalar_series(acc, f"t{k}") == [(i, float(i)) for i in range(25)]


# ------------------------------------------------------------------------ tracing
def _trace_events(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["traceEvents"]


def test_trace_step_writes_where_tensorboards_profiler_plugin_reads(tmp_path):
    logdir = str(tmp_path / "logs")
    net = torch.nn.Linear(32, 8)
    rec = summaries.add_histogram_summary(net.weight, "w")
    with summaries.SummaryWriter(str(tmp_path / "events")) as writer:
        with summaries.trace_step(logdir, 120) as path:
            net(torch.randn(4, 32)).sum().backward()
            writer.write(120, [rec])
    assert path == summaries.trace_file(logdir, 120)
    profile_dir = os.path.join(logdir, "plugins", "profile")
    assert os.listdir(profile_dir) == [os.path.basename(path)]  # nothing half-written left beside it
    # torch.profiler.tensorboard_trace_handler's naming, which the plugin parses as worker and span
    worker_pattern = re.compile(r"^(.*?)(\.\d+)?\.pt\.trace\.json(?:\.gz)?$")  # torch_tb_profiler.consts.WORKER_PATTERN
    match = worker_pattern.match(os.path.basename(path))
    assert match and match.group(2) == ".000000000120" and match.group(1).endswith(f"_{os.getpid()}")
    names = {e.get("name", "") for e in _trace_events(path)}
    assert "torchslim/summaries" in names
    assert any("addmm" in n or "linear" in n for n in names), sorted(names)[:20]


def test_torch_tb_profiler_loads_the_trace(tmp_path):
    """TensorBoard's PyTorch profiler plugin finds the run and parses the trace of each step."""
    consts = pytest.importorskip("torch_tb_profiler.consts", reason="torch-tb-profiler is not installed")
    from torch_tb_profiler.profiler.data import RunProfileData

    logdir = str(tmp_path)
    for step in (0, 10):
        with summaries.trace_step(logdir, step):
            torch.nn.Linear(8, 2)(torch.randn(3, 8)).sum().backward()
    run_dir = os.path.join(logdir, "plugins", "profile")
    spans = []
    for name in sorted(os.listdir(run_dir)):
        match = consts.WORKER_PATTERN.match(name)
        assert match, name
        spans.append(match.group(2))
        data = RunProfileData.parse(match.group(1), match.group(2)[1:], os.path.join(run_dir, name), str(tmp_path / "cache"))
        profile = data[0] if isinstance(data, tuple) else data
        assert profile.events, name
    assert spans == [".000000000000", ".000000000010"]


def test_trace_step_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="argument 'step'"):
        with summaries.trace_step(str(tmp_path), -3):
            pass
    with pytest.raises(ValueError, match="argument 'logdir'"):
        with summaries.trace_step("", 1):
            pass
    assert os.listdir(str(tmp_path)) == []


# ------------------------------------------------------------- train() acceptance
def _tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(4, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(5)]
    return model, data


def _train_kwargs(**overrides):
    kw = dict(log_every_n_steps=0, save_summaries_secs=None, save_interval_secs=None)
    kw.update(overrides)
    return kw


def test_train_writes_what_tensorboard_reads_back(tmp_path):
    slim = pytest.importorskip("torchslim.learning")
    import torchslim

    logdir = str(tmp_path)
    model, data = _tiny_problem()
    summaries.add_histogram_summaries(model, prefix="weights")  # set-up: follows the live weights
    per_step = []  # what total_loss saw at each step (step i + 1 is per_step[i])

    def total_loss(batch):
        x, y = batch
        hidden = model[1](model[0](x))
        loss = torch.nn.functional.cross_entropy(model[2](hidden), y)
        summaries.add_scalar_summary(loss, "cross_entropy", prefix="losses")
        summaries.add_zero_fraction_summary(hidden, "relu")
        summaries.add_image_summary(x.reshape(4, 1, 3, 4).sigmoid(), "inputs", data_format="NCHW")
        per_step.append(
            (loss.item(), (hidden == 0).sum().item() / hidden.numel(), {n: p.detach().clone() for n, p in model.named_parameters()})
        )
        return loss

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    op = slim.create_train_op(total_loss, opt)
    slim.train(op, logdir, data=torchslim.data.repeat(data), number_of_steps=6, **_train_kwargs(save_summaries_steps=2))
    acc = read_events(logdir)
    written = [2, 4, 6]
    assert scalar_series(acc, "losses/cross_entropy") == [(s, pytest.approx(per_step[s - 1][0], rel=1e-6)) for s in written]
    assert scalar_series(acc, "losses/total_loss") == [(s, pytest.approx(per_step[s - 1][0], rel=1e-6)) for s in written]
    assert scalar_series(acc, "learning_rate") == [(s, pytest.approx(0.05)) for s in written]
    assert [s for s, _ in scalar_series(acc, "global_step/sec")] == written
    assert scalar_series(acc, "relu/Fraction_of_Zero_Values") == [
        (s, pytest.approx(per_step[s - 1][1], abs=1e-7)) for s in written
    ]
    for name, p in model.named_parameters():
        hist = acc.Histograms(f"weights/{name}")
        assert [h.step for h in hist] == written
        assert all(h.histogram_value.num == p.numel() for h in hist)
    # The weights written at step s are those after step s's update, i.e. what step s + 1 saw.
    (h4,) = [h for h in acc.Histograms("weights/0.weight") if h.step == 4]
    after_4 = per_step[4][2]["0.weight"]
    assert h4.histogram_value.sum == pytest.approx(after_4.sum().item(), abs=1e-4)
    for s in written:
        img = [e for e in acc.Images("inputs/image/0") if e.step == s]
        assert [(e.width, e.height) for e in img] == [(4, 3)]
    assert len(acc.Images("inputs/image/2")) == 3 and acc.Tags()["images"].count("inputs/image/3") == 0


def test_train_gradient_summaries(tmp_path):
    slim = pytest.importorskip("torchslim.learning")

    model, data = _tiny_problem(1)
    norms = []

    def total_loss(batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    op = slim.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), summarize_gradients=True)
    op.after_backward.append(lambda params: norms.append([p.grad.norm().item() for p in params]))
    slim.train(op, str(tmp_path), data=data, number_of_steps=4, **_train_kwargs(save_summaries_steps=2))
    acc = read_events(str(tmp_path))
    for i, (name, p) in enumerate(model.named_parameters()):
        assert scalar_series(acc, f"{name}/gradient_norm") == [
            (s, pytest.approx(norms[s - 1][i], rel=1e-5)) for s in (2, 4)
        ]
        assert [(h.step, h.histogram_value.num) for h in acc.Histograms(f"{name}/gradient")] == [
            (2, p.numel()), (4, p.numel())
        ]


def test_train_not_chief_writes_no_summary(tmp_path):
    slim = pytest.importorskip("torchslim.learning")

    model, data = _tiny_problem()
    summaries.add_histogram_summaries(model)
    op = slim.create_train_op(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    slim.train(op, str(tmp_path), data=data, number_of_steps=3, is_chief=False, **_train_kwargs(save_summaries_steps=1))
    assert glob.glob(os.path.join(str(tmp_path), "**", "events.out.tfevents.*"), recursive=True) == []


def test_train_resumed_from_checkpoint_appends_without_duplicates(tmp_path):
    """Run 1 checkpoints at step 4, writes summaries up to step 6 and crashes at step 7;
    run 2 resumes from step 4 in the same logdir. TensorBoard must show steps 1..9 once each."""
    slim = pytest.importorskip("torchslim.learning")
    import torchslim

    logdir = str(tmp_path)
    seen = {}

    def run(crash_at, number_of_steps):
        torchslim.collections.reset()
        model, data = _tiny_problem()
        op_holder = {}

        def total_loss(batch):
            step = op_holder["op"].step + 1
            if step == crash_at:
                raise RuntimeError("simulated crash")
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            summaries.add_scalar_summary(loss, "loss")
            seen[step] = loss.item()
            return loss

        op = slim.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        op_holder["op"] = op
        summaries.add_histogram_summaries(model)
        slim.train(
            op, logdir, data=torchslim.data.repeat(data), number_of_steps=number_of_steps,
            **_train_kwargs(save_summaries_steps=1, save_interval_steps=4),
        )
        return op

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_at=7, number_of_steps=20)
    first = read_events(logdir)
    assert [s for s, _ in scalar_series(first, "loss")] == [1, 2, 3, 4, 5, 6]
    op = run(crash_at=None, number_of_steps=9)
    assert op.step == 9
    acc = read_events(logdir)
    series = scalar_series(acc, "loss")
    assert [s for s, _ in series] == list(range(1, 10))  # increasing, nothing twice, nothing rewound
    assert series == [(s, pytest.approx(seen[s], rel=1e-6)) for s in range(1, 10)]
    assert [h.step for h in acc.Histograms("0.weight")] == list(range(1, 10))
    assert [e.step for e in acc.Scalars("losses/total_loss")] == list(range(1, 10))


# The parts of a step as named regions: the train op's own, then what the Supervisor does after it.
TRAIN_OP_REGIONS = ("torchslim/loss", "torchslim/backward", "torchslim/gradients", "torchslim/optimizer", "torchslim/update_ops")
AFTER_STEP_REGIONS = ("torchslim/summaries", "torchslim/checkpoint")


def test_train_traces_the_steps_starting_at_global_steps_0_n_2n(tmp_path):
    slim = pytest.importorskip("torchslim.learning")

    model, data = _tiny_problem()
    op = slim.create_train_op(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    slim.train(op, str(tmp_path), data=data, number_of_steps=5, trace_every_n_steps=2, **_train_kwargs())
    profile_dir = os.path.join(str(tmp_path), "plugins", "profile")
    assert sorted(os.listdir(profile_dir)) == [
        os.path.basename(summaries.trace_file(str(tmp_path), s)) for s in (0, 2, 4)
    ]
    for s in (0, 2, 4):
        names = {e.get("name", "") for e in _trace_events(summaries.trace_file(str(tmp_path), s))}
        assert any("addmm" in n or "linear" in n for n in names), sorted(names)[:20]
        missing = [r for r in TRAIN_OP_REGIONS if r not in names]
        assert not missing, missing
        assert not [r for r in AFTER_STEP_REGIONS if r in names]  # nothing was due on these steps


def test_a_traced_step_shows_the_summaries_and_checkpoint_written_after_it(tmp_path):
    slim = pytest.importorskip("torchslim.learning")

    model, data = _tiny_problem()
    op = slim.create_train_op(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    slim.train(op, str(tmp_path), data=data, number_of_steps=3, trace_every_n_steps=2,
               **_train_kwargs(save_summaries_steps=1, save_interval_steps=1))
    for s in (0, 2):
        names = {e.get("name", "") for e in _trace_events(summaries.trace_file(str(tmp_path), s))}
        missing = [r for r in TRAIN_OP_REGIONS + AFTER_STEP_REGIONS if r not in names]
        assert not missing, missing


# ------------------------------------------------------------------ encoding details
def test_event_checksums_match_tensorboards_own():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 12, 255, 256, 257, 1000, 4096, 10001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert event_file._masked_crc32c(data) == masked_crc32c(data), n


@pytest.mark.parametrize("walltime, step", [(1.5, 7), (0.0, 0), (1.8e9, 2**40)])
def test_events_are_encoded_byte_for_byte_as_the_protobuf_runtime_encodes_them(walltime, step):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    histograms = event_file._histogram_encodings([("h", torch.randn(100)), ("empty", torch.zeros(0))])
    image = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    for scalar in (0.0, -0.0, 1.5, -2.25, float("nan"), float("inf"), 1e300, -1e300, 1e-50):
        values = (
            event_file._summary_entries("losses/total_loss", "scalar", scalar, iter([]))
            + event_file._summary_entries("weights/h", "histogram", None, iter(histograms))
            + event_file._summary_entries("weights/empty", "histogram", None, iter(histograms[1:]))
            + event_file._summary_entries("é/image", "image", image, iter([]))
        )
        reference = Event(wall_time=walltime, step=step, summary=Summary(value=[
            Summary.Value(tag="losses/total_loss", simple_value=scalar),
            Summary.Value(tag="weights/h", histo=HistogramProto.FromString(histograms[0])),
            Summary.Value(tag="weights/empty", histo=HistogramProto.FromString(histograms[1])),
        ] + [
            Summary.Value(tag=f"é/image/image/{i}", image=Summary.Image(
                height=3, width=4, colorspace=3, encoded_image_string=event_file._png(image[i])))
            for i in range(2)
        ]))
        assert event_file._event_bytes(walltime, step, values) == reference.SerializeToString(), scalar


def test_event_file_is_what_tensorboards_reader_checks(tmp_path):
    """Each record's CRCs are verified by TensorBoard's reader: a flipped byte is reported, not read."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("x", 1.5, 3)
    (path,) = glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))
    reader = PyRecordReader_New(path)
    records = []
    while True:
        try:
            reader.GetNext()
        except Exception:  # end of file
            break
        records.append(reader.record())
    assert len(records) == 2  # the file-version event, then step 3
    with open(path, "r+b") as f:
        f.seek(-6, os.SEEK_END)
        byte = f.read(1)
        f.seek(-6, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader = PyRecordReader_New(path)
    reader.GetNext()
    with pytest.raises(Exception, match="(?i)crc|checksum|corrupt"):
        reader.GetNext()


def test_bucket_limits_are_torch_tensorboards_default_bins_plus_tfs_outer_limits(tmp_path):
    from torch.utils.tensorboard import SummaryWriter as TorchWriter

    torch_writer = TorchWriter(str(tmp_path))
    try:
        default_bins = torch_writer.default_bins
    finally:
        torch_writer.close()
    limits = summary_writer.BUCKET_LIMITS
    assert limits[1:-1] == default_bins
    assert limits[0] == -limits[-1] == -np.finfo(np.float64).max


def test_histogram_buckets_follow_tensorflows_definition(tmp_path):
    values = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.05, -2.0, 3e-13, 5e7, -1e-30, 1e-12, -1e-12], dtype=torch.float64)
    summaries.add_histogram_summary(values, "h")
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.write(1)
    (h,) = read_events(str(tmp_path)).Histograms("h")
    hv = h.histogram_value
    # TF (histogram.cc): limits +-1e-12 * 1.1**k, 0 and +-DBL_MAX; v counts in the first bucket whose limit is > v.
    limits = summary_writer.BUCKET_LIMITS
    expected: dict[float, int] = {}
    for v in values.tolist():
        right = next(x for x in limits if x > v)
        expected[right] = expected.get(right, 0) + 1
    got = {lim: int(c) for lim, c in zip(hv.bucket_limit, hv.bucket) if c > 0}
    assert got == pytest.approx(expected)
    # Between the lowest and highest bucket, each run of empty buckets is kept as its last one only.
    kept = list(hv.bucket_limit)
    assert kept == sorted(kept) and set(expected) <= set(kept)
    for left, right in itertools.pairwise(kept):
        skipped = [x for x in limits if left < x < right]
        assert all(x not in expected for x in skipped)
    assert (hv.num, hv.min, hv.max, hv.sum) == (11, -2.0, 5e7, pytest.approx(values.sum().item()))
    assert hv.sum_squares == pytest.approx((values * values).sum().item())


def _tf_histogram(values: list[float]) -> tuple[list[float], list[int]]:
    """TF's buckets for ``values``, one value at a time: the kept limits and their counts."""
    limits = summary_writer.BUCKET_LIMITS
    counts = [0] * len(limits)
    for v in values:
        counts[next((i for i, x in enumerate(limits) if x > v), len(limits) - 1)] += 1  # DBL_MAX: the last
    first = next(i for i, c in enumerate(counts) if c)
    kept = [i for i in range(first, len(limits)) if counts[i] or (i + 1 < len(limits) and counts[i + 1])]
    return [limits[i] for i in kept], [counts[i] for i in kept]


def test_histograms_of_many_writes_each_follow_tensorflows_definition(tmp_path):
    # The writer thread takes writes in batches and computes their histograms together: each must still be its own.
    torch.manual_seed(0)
    limits = torch.tensor(summary_writer.BUCKET_LIMITS[1:-1], dtype=torch.float64)
    tensors = {
        "tiny": torch.randn(50, dtype=torch.float64) * 1e-13,
        "weights": torch.randn(4, 8) * 0.1,
        "huge": torch.randn(30, dtype=torch.float64) * 1e25,
        "on_limits": torch.cat([limits[::97], -limits[::89], torch.tensor([0.0, 1.7976931348623157e308, 5e-324], dtype=torch.float64)]),
        "ints": torch.arange(-5, 6),
    }
    records = [summaries.add_histogram_summary(t, name) for name, t in tensors.items()]
    expected: dict[str, list[tuple[list[float], list[int]]]] = {name: [] for name in tensors}
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 6):
            for name, t in tensors.items():
                t.neg_() if step % 2 else t.add_(step)  # new values each step; the writer reads its own copies
                expected[name].append(_tf_histogram(t.double().reshape(-1).tolist()))
            writer.write(step, records)
            if step == 2:
                writer.flush()
    events = read_events(str(tmp_path))
    for name in tensors:
        got = events.Histograms(name)
        assert [h.step for h in got] == [1, 2, 3, 4, 5]
        assert [(list(h.histogram_value.bucket_limit), [int(c) for c in h.histogram_value.bucket]) for h in got] == expected[name]


@pytest.mark.parametrize("group_values", [1 << 16, 50])
def test_histograms_in_a_reused_workspace_are_those_in_fresh_arrays(monkeypatch, group_values):
    # The writer computes float32 groups in one workspace, kept between batches; a batch of another
    # layout, mixed dtypes and a tensor past the workspace's size take fresh arrays: all encode alike.
    monkeypatch.setattr(event_file, "_GROUP_VALUES", group_values)
    monkeypatch.setattr(event_file, "_native", None)  # the numpy path, whose groups the workspace holds
    torch.manual_seed(3)
    workspace = event_file._Workspace()
    batches = [
        [("a", torch.randn(40)), ("b", torch.randn(7, 3) * 1e4), ("empty", torch.zeros(0))],
        [("a", torch.randn(40)), ("b", torch.randn(7, 3) * 1e-6), ("empty", torch.zeros(0))],  # same layout
        [("c", torch.randn(100)), ("d", torch.randn(5, dtype=torch.float64)), ("e", torch.arange(6))],
        [("big", torch.randn(200)), ("zeros", torch.zeros(9))],
    ]
    for named in batches * 2:
        assert event_file._histogram_encodings(named, workspace) == event_file._histogram_encodings(named)
    assert workspace.size > 0


def test_the_compiled_histogram_loop_encodes_as_numpy_does(monkeypatch):
    # torchslim/_histograms.c is built at install where a C compiler is found (setup.py), as on these
    # machines and in CI; its protos must hold numpy's buckets, min, max and count, and sums equal to
    # rounding; where the sums agree exactly, the bytes are the same.
    if event_file._native is None:
        pytest.skip("torchslim._histograms was not built (no C compiler at install): numpy does the work")
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    rng = np.random.default_rng(5)
    limits = np.array(summary_writer.BUCKET_LIMITS[1:-1], dtype=np.float32)
    f32 = np.finfo(np.float32)
    rows = [
        ("limits", np.concatenate([limits, np.nextafter(limits, np.float32(np.inf)), -limits])),
        ("edges", np.array([0.0, -0.0, f32.smallest_subnormal, -f32.tiny, f32.max, f32.min], np.float32)),
        ("empty", np.zeros(0, np.float32)),
        ("spread", (rng.standard_normal(5000) * 10.0 ** rng.uniform(-30, 30, 5000)).astype(np.float32)),
        ("weights", (rng.standard_normal((64, 128)) * 0.1).astype(np.float32).reshape(-1)),
        ("one", np.array([3.5], np.float32)),
        ("zeros", np.zeros(7, np.float32)),  # sum and sum_squares 0: left out of the proto
        ("gaps", np.array([-3e5, 1e-10, 1e-10, 5.0, 4e5, 4e5], np.float32)),  # empty runs between buckets
        ("ints", np.arange(-20, 21, dtype=np.float32)),
    ]
    native = event_file._group_protos(rows)
    monkeypatch.setattr(event_file, "_native", None)
    numpy = event_file._group_protos(rows)
    for (tag, values), a, b in zip(rows, native, numpy):
        ha, hb = HistogramProto.FromString(a), HistogramProto.FromString(b)
        assert (ha.num, ha.min, ha.max, list(ha.bucket_limit), list(ha.bucket)) == (
            hb.num, hb.min, hb.max, list(hb.bucket_limit), list(hb.bucket)), tag
        # summed in order (as TF sums) against numpy's pairwise sums: equal to the rounding of the terms
        doubles = values.astype(np.float64)
        assert abs(ha.sum - hb.sum) <= 1e-12 * np.abs(doubles).sum(), tag
        assert abs(ha.sum_squares - hb.sum_squares) <= 1e-12 * (doubles * doubles).sum(), tag
        if (ha.sum, ha.sum_squares) == (hb.sum, hb.sum_squares):
            assert a == b, tag
    assert sum(a == b for a, b in zip(native, numpy)) >= 5  # empty, one, zeros, gaps, ints at least
    monkeypatch.undo()
    for bad in (np.nan, np.inf, -np.inf):  # the tensor is named, and no count lands outside its row
        values = np.array([1.0, bad, 2.0], np.float32)
        with pytest.raises(ValueError, match="histogram summary 'bad': the tensor holds NaN or infinite values"):
            event_file._group_protos([("good", np.ones(4, np.float32)), ("bad", values)])
    tables = (event_file._CELL_BUCKETS, event_file._THRESHOLDS, event_file._LIMITS)
    for wrong in (np.ones(3), np.ones(3, np.int32)):  # a wrong dtype never reaches the loop, of any item size
        with pytest.raises(ValueError, match="each array must have items of 4 bytes of format 'f'"):
            event_file._native.float32_histogram_protos([wrong], *tables)
    with pytest.raises(ValueError, match="limits must have items of 8 bytes"):
        event_file._native.float32_histogram_protos([np.ones(3, np.float32)], *tables[:2], tables[1])
    with pytest.raises(ValueError, match="wrong size"):
        event_file._native.float32_histogram_protos([np.ones(3, np.float32)], *tables[:2], tables[2][:10])
    # a live float32 CPU tensor is passed as (address, count), which the loop reads as it reads a buffer
    weights = torch.from_numpy(rows[4][1].copy())
    by_address = event_file._native.float32_histogram_protos([(weights.data_ptr(), weights.numel())], *tables)
    assert by_address == [native[4]]
    assert event_file._native.float32_histogram_protos([(0, 0)], *tables) == [native[2]]  # empty: no read
    for wrong in ((0, 3), (weights.data_ptr(), -1)):
        with pytest.raises(ValueError, match="an \\(address, count\\) is not valid"):
            event_file._native.float32_histogram_protos([wrong], *tables)


def test_snapshot_buffers_are_reused_and_every_write_keeps_its_own_values(tmp_path):
    # write() copies float32 CPU values into one buffer, which the writer hands back once written and a
    # later write reuses: each step's values must still be that step's.
    t = torch.zeros(50)
    summaries.add_histogram_summary(t, "t")
    summaries.add_scalar_summary(t[3], "t3")
    for asynchronous in (False, True):
        logdir = tmp_path / str(asynchronous)
        with summaries.SummaryWriter(str(logdir), asynchronous=asynchronous) as writer:
            for step in range(1, 13):
                t.fill_(float(step))
                writer.write(step, scalars={"lr": 0.5 * step, "loss": t[0] * 2})
                if step % 3 == 0:
                    writer.flush()  # the writer thread takes the writes so far and hands their buffers back
            taken = len(writer._buffers._free)
        assert taken >= 1  # handed back
        acc = read_events(str(logdir))
        assert scalar_series(acc, "t3") == [(s, float(s)) for s in range(1, 13)]
        assert scalar_series(acc, "lr") == [(s, 0.5 * s) for s in range(1, 13)]
        assert scalar_series(acc, "loss") == [(s, 2.0 * s) for s in range(1, 13)]
        assert [(h.step, h.histogram_value.min, h.histogram_value.max, h.histogram_value.num) for h in acc.Histograms("t")] == [
            (s, float(s), float(s), 50) for s in range(1, 13)
        ]


def test_snapshot_compiled_copy_takes_what_torch_cat_takes(monkeypatch):
    # summary_records copies float32 CPU tensors by their addresses (torchslim/_histograms.c's
    # gather_float32); a non-contiguous one, a tensor subclass or a build without the extension takes
    # torch.cat. Both must copy the same values, at the time of the snapshot.
    from torchslim import summary_records

    if summary_records._gather_float32 is None:
        pytest.skip("torchslim._histograms was not built (no C compiler at install): torch.cat does the copy")
    weight = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
    loss = (weight * 2).sum()  # requires grad: read without a graph
    records = [
        summary_records.SummaryRecord("w", "histogram", weight),
        summary_records.SummaryRecord("w[1:]", "histogram", weight[1:]),  # a contiguous view: its own offset
        summary_records.SummaryRecord("loss", "scalar", loss),
        summary_records.SummaryRecord("one", "scalar", torch.full((1, 1), 7.0)),
        summary_records.SummaryRecord("frac", "scalar", weight, reduce="zero_fraction"),
        summary_records.SummaryRecord("i", "histogram", torch.arange(5)),  # int64: cloned on its own
    ]
    fast = summary_records._snapshot(records)
    with torch.no_grad():
        weight.add_(100.0)  # after the snapshot: not in it
    assert not fast.flat.requires_grad and fast.flat.grad_fn is None
    expected = torch.cat([torch.arange(12.0), torch.arange(4.0, 12.0), torch.tensor([132.0, 7.0])])
    assert torch.equal(fast.flat, expected)
    fast_values = summary_records._finalize(fast)
    with torch.no_grad():
        weight.sub_(100.0)
    for compiled in (None, summary_records._gather_float32):
        monkeypatch.setattr(summary_records, "_gather_float32", compiled)
        transposed = [summary_records.SummaryRecord("w", "histogram", weight.t()), *records[1:]]  # torch.cat
        for rs in (records, transposed):
            snap = summary_records._snapshot(rs)
            assert torch.equal(snap.flat[12:], expected[12:])
            values = summary_records._finalize(snap)
            assert [(t, k) for t, k, _ in values] == [(t, k) for t, k, _ in fast_values]
            for (_, _, a), (_, _, b) in zip(values[1:], fast_values[1:]):
                assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(summary_records._finalize(summary_records._snapshot(transposed))[0][2], weight.detach().t().reshape(-1).numpy())
    gather = summary_records._gather_float32
    out = torch.zeros(4)
    assert gather(out.data_ptr(), 4, [(weight.data_ptr(), 3), (0, 0)]) == 3 and out.tolist() == [0.0, 1.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="source 1 \\(count 2\\) is not valid or does not fit in the 1 values left"):
        gather(out.data_ptr(), 4, [(weight.data_ptr(), 3), (weight.data_ptr(), 2)])
    with pytest.raises(ValueError, match="source 0 \\(count 1\\) is not valid"):
        gather(out.data_ptr(), 4, [(0, 1)])
    with pytest.raises(TypeError, match="each source must be an \\(address, count\\) tuple"):
        gather(out.data_ptr(), 4, [weight.data_ptr()])
    with pytest.raises(ValueError, match="the destination address is 0"):
        gather(0, 4, [(weight.data_ptr(), 3)])
    assert out.tolist() == [0.0, 1.0, 2.0, 0.0]  # a refused call copies nothing


def test_write_scalars_are_checked_before_anything_is_queued(tmp_path):
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="argument 'scalars' must be a dict"):
            writer.write(1, records=[], scalars=[("lr", 0.1)])
        with pytest.raises(ValueError, match="argument 'scalars': a tag must be a non-empty string"):
            writer.write(1, records=[], scalars={"": 0.1})
        with pytest.raises(ValueError, match="argument 'scalars': the value of 'lr' must be a number"):
            writer.write(1, records=[], scalars={"lr": "0.1"})
        with pytest.raises(ValueError, match="argument 'scalars': the value of 'x' must hold one real value"):
            writer.write(1, records=[], scalars={"x": torch.ones(3)})
        writer.write(2, records=[], scalars={"lr": 0.25})
    assert scalar_series(read_events(str(tmp_path)), "lr") == [(2, 0.25)]


def test_float32_buckets_looked_up_by_bit_pattern_are_tensorflows():
    # The float32 path finds a bucket from the top bits of each value (event_file._CELL_BUCKETS): check it
    # on every limit, the float32 values on either side of each, zeros, denormals, the extremes, and a
    # spread of random magnitudes, against the first limit > v compared as doubles (TF's definition).
    limits = np.array(summary_writer.BUCKET_LIMITS)
    inner = limits[1:-1].astype(np.float32)
    rng = np.random.default_rng(0)
    f32 = np.finfo(np.float32)
    values = np.concatenate([
        inner, np.nextafter(inner, np.float32(np.inf)), np.nextafter(inner, np.float32(-np.inf)),
        np.array([0.0, -0.0, f32.smallest_subnormal, -f32.smallest_subnormal, f32.tiny, -f32.tiny, f32.max, f32.min], np.float32),
        (rng.standard_normal(20000) * 10.0 ** rng.uniform(-40, 38, 20000)).astype(np.float32),
    ]).astype(np.float32)
    cells = np.right_shift(values.view(np.uint32), event_file._CELL_SHIFT)
    expected = np.minimum(np.searchsorted(limits, values.astype(np.float64), side="right"), len(limits) - 1)
    buckets = event_file._CELL_BUCKETS[cells].astype(np.intp)
    assert np.array_equal(buckets + (values.astype(np.float64) >= limits[buckets]), expected)
    assert np.array_equal(buckets + (values >= event_file._THRESHOLDS[buckets]), expected)  # as float32, the same
    # and through the histogram itself, against one value at a time
    sample = values[rng.choice(values.size, 400, replace=False)]
    (proto,) = event_file._histogram_encodings([("v", sample)])
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    h = HistogramProto.FromString(proto)
    assert (list(h.bucket_limit), [int(c) for c in h.bucket]) == _tf_histogram(sample.astype(np.float64).tolist())


@pytest.mark.parametrize("group_values, group_rows", [(7, 1024), (1 << 20, 2)])
def test_histograms_computed_in_several_groups_each_follow_tensorflows_definition(monkeypatch, group_values, group_rows):
    # A batch's histograms are computed together up to a number of values and of tensors; past either, in groups.
    monkeypatch.setattr(event_file, "_GROUP_VALUES", group_values)
    monkeypatch.setattr(event_file, "_GROUP_ROWS", group_rows)
    torch.manual_seed(1)
    named = [("a", torch.randn(20) * 1e-3), ("empty", torch.zeros(0)), ("b", torch.randn(3, 4, dtype=torch.float64)),
             ("c", -torch.rand(9) * 1e6), ("d", torch.tensor([0.0, -0.0, 5e-324], dtype=torch.float64)),
             ("e", torch.randn(30).to(torch.bfloat16))]
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    protos = [HistogramProto.FromString(b) for b in event_file._histogram_encodings(named)]
    assert len(protos) == len(named)
    for (tag, t), proto in zip(named, protos):
        values = t.double().reshape(-1).tolist()
        if not values:
            assert (proto.num, list(proto.bucket)) == (0, []), tag
            continue
        assert (list(proto.bucket_limit), [int(c) for c in proto.bucket]) == _tf_histogram(values), tag
        assert (proto.num, proto.min, proto.max) == (len(values), min(values), max(values)), tag
        assert proto.sum == pytest.approx(sum(values)) and proto.sum_squares == pytest.approx(sum(v * v for v in values))


def test_an_empty_histogram_is_written_as_tensorflow_writes_one(tmp_path):
    # add_histogram_summary refuses an empty tensor; a SummaryRecord made by hand can still hold one.
    records = [summary_writer.SummaryRecord("empty", "histogram", torch.zeros(0)), summaries.add_histogram_summary(torch.ones(3), "ones")]
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.write(1, records)
    events = read_events(str(tmp_path))
    (empty,) = events.Histograms("empty")
    hv = empty.histogram_value
    assert (hv.num, hv.min, hv.max, list(hv.bucket)) == (0, np.finfo(np.float64).max, -np.finfo(np.float64).max, [])
    assert list(events.Histograms("ones")[0].histogram_value.bucket) == [3]


# ------------------------------------------------------------------ the writer thread's bounds
class _HungHandler(logging.Handler):
    """A logging handler that blocks until released: what a log shipper to a dead server does."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.unblock = threading.Event()

    def createLock(self):  # no handler lock: the stuck writer thread would hold it against the training thread
        self.lock = None

    def emit(self, record):
        if threading.current_thread().name.startswith("torchslim-summary-writer"):  # the training thread logs too
            self.entered.set()
            self.unblock.wait(120)


@pytest.fixture
def hung_log_handler():
    handler = _HungHandler()
    log = logging.getLogger("torchslim")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    handler.unblock.set()
    log.removeHandler(handler)
    log.setLevel(old_level)


def _wait_for_writer_threads_to_end(timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while any(t.name.startswith("torchslim-summary-writer") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the writer thread did not end once released"
        time.sleep(0.01)


def test_a_stalled_writer_thread_becomes_an_error_within_the_timeout(tmp_path, hung_log_handler):
    import time

    printed = summaries.add_scalar_summary(torch.tensor(1.0), "printed", print_summary=True)
    writer = summaries.SummaryWriter(str(tmp_path), timeout=0.5, max_pending=1)
    writer.write(1, [printed])
    assert hung_log_handler.entered.wait(30)  # the writer thread is now stuck in the handler
    start = time.monotonic()
    with pytest.raises(summaries.SummaryWriterError, match=r"did not flush within timeout=0.5 s"):
        writer.flush()
    assert time.monotonic() - start < 5.0
    start = time.monotonic()
    with pytest.raises(summaries.SummaryWriterError, match="did not flush"):  # no second wait
        writer.write(2, [printed])
    with pytest.raises(summaries.SummaryWriterError, match="did not flush"):
        writer.close()
    assert time.monotonic() - start < 1.0
    hung_log_handler.unblock.set()
    _wait_for_writer_threads_to_end()


@pytest.mark.parametrize("bound", ["count", "bytes"])
def test_a_full_queue_in_front_of_a_stalled_thread_is_an_error_not_a_hang(tmp_path, hung_log_handler, monkeypatch, bound):
    import time

    printed = summaries.add_scalar_summary(torch.tensor(1.0), "printed", print_summary=True)
    if bound == "count":  # a queue of one write
        writer = summaries.SummaryWriter(str(tmp_path), timeout=0.3, max_pending=1)
        queued = printed
    else:  # room for one of the 4,000-byte copies; the default count bound is far away
        monkeypatch.setattr(summary_writer, "MAX_QUEUED_BYTES", 6000)
        writer = summaries.SummaryWriter(str(tmp_path), timeout=0.3)
        queued = summaries.SummaryRecord("big", "histogram", torch.ones(1000))
    writer.write(1, [printed])
    assert hung_log_handler.entered.wait(30)
    writer.write(2, [queued])  # fills the queue
    start = time.monotonic()
    with pytest.raises(summaries.SummaryWriterError, match="full queue"):
        writer.write(3, [queued])
    assert time.monotonic() - start < 5.0
    with pytest.raises(summaries.SummaryWriterError):
        writer.close()
    hung_log_handler.unblock.set()
    _wait_for_writer_threads_to_end()


def test_copies_past_half_the_byte_bound_wake_the_writer_before_its_linger_ends(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(summary_writer, "_LINGER_SECS", 60.0)  # only a wake makes the thread write
    monkeypatch.setattr(summary_writer, "MAX_QUEUED_BYTES", 10_000)
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.write(1, [summaries.SummaryRecord("small", "histogram", torch.ones(10))])  # 40 bytes: no wake
        time.sleep(0.2)
        assert writer._queued_bytes == 40  # still waiting for the thread
        writer.write(2, [summaries.SummaryRecord("big", "histogram", torch.full((1500,), 2.0))])  # 6,000 bytes
        deadline = time.monotonic() + 10
        while writer._queued_bytes:  # the thread takes both writes once woken
            assert time.monotonic() < deadline, "the writer was not woken by the bytes waiting"
            time.sleep(0.01)
    acc = read_events(str(tmp_path))
    assert [h.step for h in acc.Histograms("small")] == [1] and [h.step for h in acc.Histograms("big")] == [2]


def test_a_megabyte_of_waiting_copies_wakes_the_writer_so_their_buffers_come_back(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(summary_writer, "_LINGER_SECS", 60.0)  # only a wake makes the thread write
    monkeypatch.setattr(summary_writer, "_WAKE_BYTES", 4_000)
    t = torch.ones(500)  # 2,000 bytes a write
    with summaries.SummaryWriter(str(tmp_path)) as writer:
        writer.write(1, [summaries.SummaryRecord("t", "histogram", t)])
        time.sleep(0.2)
        assert writer._queued_bytes == 2_000 and not writer._buffers._free  # below the bound: no wake
        writer.write(2, [summaries.SummaryRecord("t", "histogram", t)])
        deadline = time.monotonic() + 10
        while len(writer._buffers._free) < 2:  # written, and both buffers handed back for reuse
            assert time.monotonic() < deadline, "the writer was not woken by the bytes waiting"
            time.sleep(0.01)
        assert writer._queued_bytes == 0
    assert [h.step for h in read_events(str(tmp_path)).Histograms("t")] == [1, 2]


def test_train_with_a_stalled_writer_returns_summary_writer_error_within_the_bound(tmp_path, hung_log_handler):
    import time

    slim = pytest.importorskip("torchslim.learning")
    model, data = _tiny_problem()
    summaries.add_scalar_summary(torch.tensor(1.0), "printed", print_summary=True)
    op = slim.create_train_op(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    writer = summaries.SummaryWriter(str(tmp_path), timeout=0.5)
    start = time.monotonic()
    with pytest.raises(summaries.SummaryWriterError, match="timeout=0.5"):
        slim.train(op, str(tmp_path), data=data, number_of_steps=3, summary_writer=writer,
                   **_train_kwargs(save_summaries_steps=1))
    assert time.monotonic() - start < 30.0  # 3 steps, a final checkpoint, and one bounded wait
    with pytest.raises(summaries.SummaryWriterError):
        writer.close()
    hung_log_handler.unblock.set()
    _wait_for_writer_threads_to_end()


def test_no_writer_thread_outlives_close_or_train(tmp_path):
    slim = pytest.importorskip("torchslim.learning")

    def writer_threads():
        return [t for t in threading.enumerate() if t.name.startswith("torchslim-summary-writer")]

    writer = summaries.SummaryWriter(str(tmp_path / "a"))
    assert len(writer_threads()) == 1
    writer.close()
    assert writer_threads() == []
    model, data = _tiny_problem()
    summaries.add_histogram_summaries(model)
    op = slim.create_train_op(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1)
    )
    slim.train(op, str(tmp_path / "b"), data=data, number_of_steps=3, **_train_kwargs(save_summaries_steps=1))
    assert writer_threads() == []
    assert [h.step for h in read_events(str(tmp_path / "b")).Histograms("0.weight")] == [1, 2, 3]


def test_writer_rejects_a_bad_timeout(tmp_path):
    for bad in (0, -1.0, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="argument 'timeout'"):
            summaries.SummaryWriter(str(tmp_path / "x"), timeout=bad)
    assert not os.path.exists(str(tmp_path / "x"))


@pytest.mark.slow
def test_what_was_flushed_survives_a_training_process_that_dies_without_close(tmp_path, python_exe, subprocess_env):
    import subprocess

    code = (
        "import os, torch\n"
        "from torchslim import summaries\n"
        f"w = summaries.SummaryWriter({str(tmp_path)!r})\n"
        "w.add_scalar('loss', 0.5, 7)\n"
        "w.write(7, records=[summaries.add_histogram_summary(torch.ones(5), 'h')])\n"
        "w.flush()\n"
        "w.add_scalar('loss', 0.25, 8)\n"
        "os._exit(0)\n"  # no close, no atexit
    )
    subprocess.run([python_exe, "-c", code], env=subprocess_env, check=True, timeout=120, capture_output=True)
    acc = read_events(str(tmp_path))
    assert scalar_series(acc, "loss") == [(7, 0.5)]
    assert [h.step for h in acc.Histograms("h")] == [7]
