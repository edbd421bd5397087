"""Tests for torchslim.model_analyzer, ported from TF-Slim's analyzer scenarios.

Expected figures are either computed by hand (the arithmetic is in the
comments), torchvision's published figures, or torch.utils.flop_counter's own
count of the same forward pass.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests import models_zoo
from torchslim import model_analyzer as ma

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _meta(factory):
    with torch.device("meta"):
        return factory()


def _flop_counter_total(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


# ------------------------------------------------------------ tensor_description
def test_tensor_description_matches_tf_slim_format():
    assert ma.tensor_description(torch.zeros(1, 8, 8, 1024)) == "(float32 1x8x8x1024)"
    assert ma.tensor_description(torch.zeros(3, dtype=torch.int32)) == "(int32 3)"
    assert ma.tensor_description(torch.zeros(2, 0, dtype=torch.bfloat16)) == "(bfloat16 2x0)"
    assert ma.tensor_description(nn.Parameter(torch.zeros(2, 5))) == "(float32 2x5)"
    assert ma.tensor_description(torch.empty(4, 4, device="meta", dtype=torch.float16)) == "(float16 4x4)"
    # TF-Slim joins no dimensions for a scalar, leaving the space before ')'.
    assert ma.tensor_description(torch.tensor(True)) == "(bool )"


def test_tensor_description_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"tensor_description: var must be a tensor.*got list"):
        ma.tensor_description([1, 2])


# ------------------------------------------------------------ analyze_vars
def test_analyze_vars_prints_tf_slim_lines(capsys):
    total = ma.analyze_vars(models_zoo.tiny_convnet(), print_info=True)
    # conv: 2x1x3x3 = 18 weights + 2 biases; fc: 3x32 = 96 weights + 3 biases; 4 bytes each.
    assert total == (18 + 2 + 96 + 3, 4 * (18 + 2 + 96 + 3))
    assert capsys.readouterr().out.splitlines() == [
        "---------",
        "Variables: name (type shape) [size]",
        "---------",
        "conv.weight (float32 2x1x3x3) [18, bytes: 72]",
        "conv.bias (float32 2) [2, bytes: 8]",
        "fc.weight (float32 3x32) [96, bytes: 384]",
        "fc.bias (float32 3) [3, bytes: 12]",
        "Total size of variables: 119",
        "Total bytes of variables: 476",
    ]


def test_analyze_vars_is_silent_without_print_info(capsys):
    assert ma.analyze_vars(nn.Linear(4, 5)) == (25, 100)  # 4x5 + 5, float32
    assert capsys.readouterr().out == ""


def test_analyze_vars_lists_buffers_apart_and_does_not_count_them(capsys):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    # Parameters only: linear 2x3 + 3, batch norm weight 3 + bias 3 = 15.
    assert ma.analyze_vars(model, print_info=True) == (15, 60)
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("Total bytes of variables: 60") + 1:] == [
        "---------",
        "Buffers: name (type shape) [size]",
        "---------",
        "1.running_mean (float32 3) [3, bytes: 12]",
        "1.running_var (float32 3) [3, bytes: 12]",
        "1.num_batches_tracked (int64 ) [1, bytes: 8]",
        "Total size of buffers: 7",
        "Total bytes of buffers: 32",
    ]


def test_analyze_vars_accepts_lists_pairs_and_state_dicts():
    a, b = torch.zeros(2, 3), torch.zeros(4, dtype=torch.float64)
    assert ma.analyze_vars([a, b]) == (10, 6 * 4 + 4 * 8)
    assert ma.analyze_vars([("a", a), ("b", b)]) == (10, 56)
    assert ma.analyze_vars({"a": a, "b": b}) == (10, 56)
    assert ma.analyze_vars(iter([a])) == (6, 24)
    assert ma.analyze_vars([]) == (0, 0)
    # A state_dict holds buffers too: what is passed is what counts, as in TF-Slim.
    state = nn.BatchNorm1d(3).state_dict()
    assert ma.analyze_vars(state) == (3 + 3 + 3 + 3 + 1, 4 * 12 + 8)


def test_analyze_vars_counts_tied_weights_once(capsys):
    model = models_zoo.TiedLM()
    # embed 10x4 = 40 (shared with head), layer norm 4 + 4.
    assert ma.analyze_vars(model, print_info=True) == (48, 192)
    out = capsys.readouterr().out
    assert "head.weight (float32 10x4) [tied to embed.weight, counted once]" in out
    # The same through a list of parameters, (name, tensor) pairs and a state_dict,
    # whose tensors are new objects sharing the tied storage.
    assert ma.analyze_vars(list(model.parameters())) == (48, 192)
    assert ma.analyze_vars([model.embed.weight, model.head.weight, model.norm.weight]) == (44, 176)
    assert ma.analyze_vars(model.state_dict()) == (48, 192)
    assert len(model.state_dict()) == 4
    # Same storage but a different view is not a tie: both count.
    w = torch.zeros(4, 4)
    assert ma.analyze_vars([w, w[0]]) == (20, 80)


def test_analyze_vars_meta_module_allocates_nothing():
    model = _meta(models_zoo.vgg16)
    size, nbytes = ma.analyze_vars(model)
    assert (size, nbytes) == (138_357_544, 4 * 138_357_544)


@pytest.mark.parametrize("factory, expected", [
    (models_zoo.resnet18, 11_689_512),
    (models_zoo.resnet50, 25_557_032),
    (models_zoo.vgg16, 138_357_544),
])
def test_analyze_vars_matches_torchvision_parameter_counts(factory, expected):
    assert ma.analyze_vars(_meta(factory)) == (expected, 4 * expected)


@pytest.mark.parametrize("bad, fragment", [
    (torch.zeros(3), r"got a single tensor \(float32 3\); pass \[tensor\] instead"),
    (5, r"expected an nn.Module or an iterable.*got int: 5"),
    ("weights", r"got str: 'weights'"),
    ([torch.zeros(1), "w"], r"variables\[1\]: expected a tensor or a \(name, tensor\) pair, got str"),
    ([("w", 3)], r"variables\[0\]: expected a tensor or a \(name, tensor\) pair, got tuple"),
])
def test_analyze_vars_rejects_bad_variables(bad, fragment):
    with pytest.raises(TypeError, match=r"^analyze_vars: .*" + fragment):
        ma.analyze_vars(bad)


def test_analyze_vars_rejects_non_bool_print_info():
    with pytest.raises(TypeError, match=r"print_info must be a bool, got str: 'yes'"):
        ma.analyze_vars([], print_info="yes")


# ------------------------------------------------------------ analyze_ops
def test_analyze_ops_prints_tf_slim_rows_flops_and_modules(capsys):
    torch.manual_seed(0)
    total = ma.analyze_ops(models_zoo.tiny_convnet(), torch.randn(1, 1, 4, 4), print_info=True)
    # conv 1x2x4x4 = 32, relu 32, flatten's view 1x32 = 32, linear: t of the 3x32 weight = 96, addmm 1x3 = 3.
    assert total == 32 + 32 + 32 + 96 + 3
    # conv: 2 FLOPs x (2 out channels x 16 positions) x (1 in channel x 3x3 kernel) = 576;
    # fc: 2 x 1 row x 32 x 3 = 192.
    assert capsys.readouterr().out.splitlines() == [
        "---------",
        "Operations: name -> (type shapes) [size]",
        "---------",
        "conv/convolution \t-> (float32 1x2x4x4) [32]",
        "relu/relu \t-> (float32 1x2x4x4) [32]",
        "view \t-> (float32 1x32) [32]",
        "fc/t \t-> (float32 32x3) [96]",
        "fc/addmm \t-> (float32 1x3) [3]",
        "Total size of ops outputs: 195",
        "---------",
        "FLOPs: name [FLOPs] (FLOPs, not MACs: a multiply-add counts 2)",
        "---------",
        "conv/convolution [576]",
        "fc/addmm [192]",
        "Total FLOPs: 768",
        "---------",
        "Modules: parameters, FLOPs and output elements (children included)",
        "---------",
        "module   type         parameters  FLOPs  outputs",
        "(model)  TinyConvNet         119    768        3",
        "  conv   Conv2d               20    576       32",
        "  relu   ReLU                  0      0       32",
        "  fc     Linear               99    192        3",
    ]


def test_profile_ops_returns_records_as_data():
    report = ma.profile_ops(models_zoo.tiny_convnet(), torch.randn(1, 1, 4, 4))
    assert [(op.name, op.op, op.module, op.outputs, op.size, op.flops) for op in report.ops] == [
        ("conv/convolution", "convolution", "conv", ((torch.float32, (1, 2, 4, 4)),), 32, 576),
        ("relu/relu", "relu", "relu", ((torch.float32, (1, 2, 4, 4)),), 32, 0),
        ("view", "view", "", ((torch.float32, (1, 32)),), 32, 0),
        ("fc/t", "t", "fc", ((torch.float32, (32, 3)),), 96, 0),
        ("fc/addmm", "addmm", "fc", ((torch.float32, (1, 3)),), 3, 192),
    ]
    assert [dict(name=m.name, type=m.type, depth=m.depth, parameters=m.parameters, flops=m.flops,
                 op_size=m.op_size, output_elements=m.output_elements, calls=m.calls)
            for m in report.modules] == [
        dict(name="", type="TinyConvNet", depth=0, parameters=119, flops=768, op_size=195,
             output_elements=3, calls=1),
        dict(name="conv", type="Conv2d", depth=1, parameters=20, flops=576, op_size=32,
             output_elements=32, calls=1),
        dict(name="relu", type="ReLU", depth=1, parameters=0, flops=0, op_size=32, output_elements=32, calls=1),
        dict(name="fc", type="Linear", depth=1, parameters=99, flops=192, op_size=99, output_elements=3,
             calls=1),
    ]
    assert (report.total_size, report.total_flops) == (195, 768)


def test_repeated_ops_get_tf_style_suffixes_and_a_reused_module_counts_calls():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu)  # the same ReLU twice
    report = ma.profile_ops(model, torch.zeros(3, 2))
    # named_modules names the shared ReLU once, as '1'; its two calls are 1/relu and 1/relu_1.
    assert [op.name for op in report.ops] == ["0/t", "0/addmm", "1/relu", "2/t", "2/addmm", "1/relu_1"]
    shared = next(m for m in report.modules if m.name == "1")
    assert (shared.calls, shared.output_elements) == (2, 2 * 3 * 2)


def test_ops_with_several_outputs_and_keyword_inputs(capsys):
    class TopK(nn.Module):
        def forward(self, x, k=1):
            return torch.topk(x, k)

    total = ma.analyze_ops(TopK(), {"x": torch.arange(6.0).view(2, 3), "k": 2}, print_info=True)
    assert total == 4 + 4  # values 2x2 and indices 2x2
    assert "topk \t-> (float32 2x2), (int64 2x2) [8]" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("factory, published_gmacs", [
    (models_zoo.resnet18, 1.81),
    (models_zoo.resnet50, 4.09),
    (models_zoo.vgg16, 15.47),
])
def test_flops_equal_flop_counter_and_torchvision_published_figures(factory, published_gmacs):
    model = _meta(factory)
    x = torch.empty(1, 3, 224, 224, device="meta")
    report = ma.profile_ops(model, x)
    assert report.total_flops == _flop_counter_total(model, x)
    # torchvision publishes GMACs; 1 MAC = 2 FLOPs.
    assert report.total_flops / 2e9 == pytest.approx(published_gmacs, rel=0.02)
    root = report.modules[0]
    assert (root.name, root.flops, root.op_size) == ("", report.total_flops, report.total_size)
    assert root.parameters == ma.analyze_vars(model)[0]
    assert root.output_elements == 1000
    # Each op's FLOPs are summed into every module around it: the top-level children add up to the root.
    assert sum(m.flops for m in report.modules if m.depth == 1) == root.flops


def test_resnet18_first_ops_and_module_rows():
    report = ma.profile_ops(_meta(models_zoo.resnet18), torch.empty(1, 3, 224, 224, device="meta"))
    first = report.ops[0]
    # 7x7 stride-2 conv, 3 -> 64 channels, 112x112 outputs: 2 x 64*112*112 x 3*7*7 FLOPs.
    assert (first.name, first.size, first.flops) == ("conv1/convolution", 64 * 112 * 112, 2 * 64 * 112 * 112 * 147)
    by_name = {m.name: m for m in report.modules}
    assert by_name["layer1.0.conv1"].parameters == 64 * 64 * 9
    assert by_name["layer1.0.conv1"].flops == 2 * 64 * 56 * 56 * 64 * 9
    assert by_name["fc"].parameters == 512 * 1000 + 1000
    assert by_name["layer4"].output_elements == 512 * 7 * 7
    assert [m.depth for m in report.modules[:3]] == [0, 1, 1]  # (model), conv1, bn1
    assert by_name["layer2.0.downsample.0"].depth == 4


def test_real_device_run_gives_the_same_numbers_as_meta():
    torch.manual_seed(0)
    real = models_zoo.resnet18()  # left in train mode: batch norm would update its statistics
    before = {k: v.clone() for k, v in real.state_dict().items()}
    real_report = ma.profile_ops(real, torch.randn(1, 3, 224, 224))
    meta_report = ma.profile_ops(_meta(models_zoo.resnet18), torch.empty(1, 3, 224, 224, device="meta"))
    assert real_report.ops == meta_report.ops
    assert real_report.modules == meta_report.modules
    # Analysing leaves the model as it was: running statistics restored, nothing trained.
    after = real.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_attention_flops_agree_between_cpu_kernel_and_meta():
    # On CPU, scaled_dot_product_attention runs a fused kernel; on meta, its math path.
    torch.manual_seed(0)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    real = ma.profile_ops(models_zoo.small_lm(), tokens)
    meta = ma.profile_ops(_meta(models_zoo.small_lm), tokens.to("meta"))
    assert real.total_flops == meta.total_flops
    # dim 32, hidden 86, vocab 64, 8 tokens, 2 layers: linears 2*8*(4*32*32 + 3*32*86) per layer + head
    # 2*8*32*64; attention q@k^T and p@v: 2 x 2*8*8*32 per layer.
    linears = 2 * (2 * 8 * (4 * 32 * 32 + 3 * 32 * 86)) + 2 * 8 * 32 * 64
    attention = 2 * (2 * 2 * 8 * 8 * 32)
    assert real.total_flops == linears + attention


def test_fake_tensors_are_analyzed_like_meta():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = models_zoo.tiny_convnet()
        report = ma.profile_ops(model, torch.randn(1, 1, 4, 4))
        assert ma.analyze_vars(model) == (119, 476)
    assert (report.total_size, report.total_flops) == (195, 768)


# ------------------------------------------------------------ bad input
def test_inputs_that_do_not_fit_raise_the_models_error_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(RuntimeError, match=r"failed in module '1\.1' \(Linear\)") as info:
        ma.profile_ops(model, torch.zeros(2, 4))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) in str(info.value)  # the model's own message is kept
    # Hooks are gone afterwards: the model runs normally again.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_error_in_the_models_own_forward_names_it():
    class Picky(nn.Module):
        def forward(self, x):
            if x.dim() != 4:
                raise ValueError(f"expected NCHW input, got {x.dim()} dims")
            return x

    with pytest.raises(ValueError, match=r"failed in the model's own forward \(Picky\): expected NCHW") as info:
        ma.analyze_ops(Picky(), torch.zeros(3))
    assert isinstance(info.value.__cause__, ValueError)


def test_meta_model_with_wrong_channels_names_the_first_conv():
    with pytest.raises(RuntimeError, match=r"module 'conv1' \(Conv2d\)"):
        ma.analyze_ops(_meta(models_zoo.resnet18), torch.empty(1, 4, 224, 224, device="meta"))


@pytest.mark.parametrize("bad", [3.0, "x", None])
def test_profile_ops_rejects_bad_example_inputs(bad):
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor, a tuple/list .* got "):
        ma.profile_ops(nn.ReLU(), bad)


def test_analyze_ops_rejects_non_callables_and_bad_print_info():
    with pytest.raises(TypeError, match=r"model must be an nn.Module \(or a callable\), got int"):
        ma.analyze_ops(3, torch.zeros(1))
    with pytest.raises(TypeError, match=r"print_info must be a bool, got int: 1"):
        ma.analyze_ops(nn.ReLU(), torch.zeros(1), print_info=1)


# ------------------------------------------------------------ 7e9 parameters on meta
_LLAMA_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from torch.utils.flop_counter import FlopCounterMode
    from tests import models_zoo
    from torchslim import model_analyzer as ma

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    # Warm up the code paths on a toy model so the delta measures the 7e9 model alone.
    with torch.device('meta'):
        ma.profile_ops(models_zoo.small_lm(), torch.zeros(1, 4, dtype=torch.long))
    start = rss_mb()
    with torch.device('meta'):
        model = models_zoo.llama_7b()
    size, nbytes = ma.analyze_vars(model)
    tokens = torch.zeros(1, 128, dtype=torch.long, device='meta')
    report = ma.profile_ops(model, tokens)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    linear_flops = sum(op.flops for op in report.ops if op.op in ('mm', 'addmm'))
    print(json.dumps(dict(size=size, nbytes=nbytes, flops=report.total_flops,
                          counter=counter.get_total_flops(), linear_flops=linear_flops,
                          rss_growth_mb=rss_mb() - start)))
""")


def test_seven_billion_parameter_model_on_meta_allocates_nothing(subprocess_env, python_exe):
    proc = subprocess.run([python_exe, "-c", _LLAMA_SCRIPT], cwd=REPO, env=subprocess_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = models_zoo.llama_7b_parameter_count(**models_zoo.LLAMA_7B)
    assert result["size"] == expected == 6_738_415_616
    assert result["nbytes"] == 4 * expected  # 27 GB, were it allocated
    assert result["flops"] == result["counter"]
    # Every linear weight (all but the embedding table and the norms' 65 x 4096 weights)
    # does 2 FLOPs per weight per token.
    linear_params = expected - 32000 * 4096 - (2 * 32 + 1) * 4096
    assert result["linear_flops"] == 2 * 128 * linear_params
    assert result["rss_growth_mb"] < 64, result  # one 4096x4096 float32 weight is 64 MiB


# ------------------------------------------------------------ command line
def test_cli_analyzes_resnet18_on_meta(subprocess_env, python_exe):
    cmd = [python_exe, "-m", "torchslim", "analyze", "tests.models_zoo:resnet18",
           "--input-shape", "1,3,224,224", "--ops", "--device", "meta"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Model: tests.models_zoo:resnet18 (ResNet) on meta"
    assert lines[1:4] == ["---------", "Variables: name (type shape) [size]", "---------"]
    assert lines[4] == "conv1.weight (float32 64x3x7x7) [9408, bytes: 37632]"
    assert "Total size of variables: 11689512" in lines
    assert "bn1.running_mean (float32 64) [64, bytes: 256]" in lines  # in the buffers section
    assert "Operations: name -> (type shapes) [size]" in lines
    assert "conv1/convolution \t-> (float32 1x64x112x112) [802816]" in lines

    model = _meta(models_zoo.resnet18).eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    flops = _flop_counter_total(model, x)
    assert f"Total FLOPs: {flops}" in lines
    assert f"Total size of ops outputs: {ma.analyze_ops(model, x)}" in lines
    assert lines[-1].startswith(f"Forward pass: {flops / 1e9:.2f} GFLOPs = {flops / 2e9:.2f} GMACs (multiply-adds)")


def test_cli_analyzes_the_shipped_demo_network_with_units(capsys):
    assert ma.main(["torchslim.demo:DigitsNet", "--input-shape", "1,1,8,8", "--ops"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Total size of variables: 38282" in lines
    # conv1 2*1*16*9*64 + conv2 2*16*32*9*64 + fc1 2*512*64 + logits 2*64*10 = 675,072 FLOPs, half as many MACs
    assert "Total FLOPs: 675072" in lines
    assert lines[-1].startswith("Forward pass: 675.07 kFLOPs = 337.54 kMACs (multiply-adds), ")


def test_cli_refuses_a_class_it_cannot_build_saying_what_it_needs(capsys):
    with pytest.raises(SystemExit) as info:
        ma.main(["torch.nn:Linear"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "torch.nn:Linear cannot be built without arguments: it needs in_features, out_features" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("value, text", [(12, "12 FLOPs"), (675072, "675.07 kFLOPs"), (1.8e6, "1.80 MFLOPs"),
                                         (3.6e9, "3.60 GFLOPs"), (2e12, "2.00 TFLOPs")])
def test_flops_are_printed_with_units(value, text):
    assert ma._si(value, "FLOPs") == text


def test_cli_vars_only_in_process(capsys):
    assert ma.main(["tests.models_zoo:TiedLM", "--device", "meta", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "embed.weight (float16 10x4) [40, bytes: 80]" in out
    assert "Total size of variables: 48" in out


def test_cli_reports_the_models_error_with_the_module(capsys):
    assert ma.main(["tests.models_zoo:tiny_convnet", "--input-shape", "1,2,4,4", "--ops"]) == 1
    assert "failed in module 'conv' (Conv2d)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["no_colon_here"], "FACTORY must look like PACKAGE.MODULE:FACTORY"),
    (["tests.no_such_module:f"], "cannot import module 'tests.no_such_module'"),
    (["tests.models_zoo:nope"], "has no attribute 'nope'"),
    (["tests.models_zoo:LLAMA_7B"], "is a dict, expected a callable"),
    (["tests.models_zoo:resnet18", "--ops"], "--ops needs --input-shape"),
    (["tests.models_zoo:resnet18", "--input-shape", "1,x,3"], "expected comma-separated non-negative integers"),
    (["tests.models_zoo:resnet18", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["tests.models_zoo:resnet18", "--device", "toaster"], "--device"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        ma.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
