"""Sizes of a model's variables and of the ops one forward pass runs, as in TF-Slim.

    import torch
    import torchslim as slim

    model = MyModel()
    slim.model_analyzer.analyze_vars(model, print_info=True)        # parameters, then buffers
    total = slim.model_analyzer.analyze_ops(model, torch.randn(1, 3, 224, 224), print_info=True)

    report = slim.model_analyzer.profile_ops(model, torch.randn(1, 3, 224, 224))
    report.total_flops, report.ops[0], report.modules[0]           # the same figures as data

    with torch.device('meta'):                                      # no memory is allocated:
        big = MyModel()                                             # a 7e9-parameter model
    slim.model_analyzer.analyze_ops(big, torch.empty(1, 3, 224, 224, device='meta'))

From a shell: ``torchslim analyze torchslim.demo:DigitsNet --input-shape 1,1,8,8 --ops`` (the demo's
network, shipped with the package), or any ``PACKAGE.MODULE:FACTORY`` that builds a model with no argument.

TF-Slim walks ``graph.get_operations()``. Eager PyTorch has no graph to walk,
so ``analyze_ops`` runs one forward pass on example inputs and records the aten
operations it actually executes, in order. How they are recorded, and why:

* A ``TorchDispatchMode`` sees every aten op below autograd, with its real
  output tensors (so their dtypes and shapes) and no tracing restrictions:
  data-dependent Python control flow, hooks and in-place ops just run.
  ``torch.fx`` symbolic tracing fails on such models and records calls, not
  aten ops; ``torch.export`` traces a whole graph with guards and costs seconds
  per model. A dispatch mode costs a Python call per op.
* Forward pre-/post-hooks on every submodule keep a stack of qualified module
  names, so each op is named ``qualified.module.name/op`` (the op's TF-Slim
  scope) and its FLOPs and outputs are summed into every module that encloses it.
* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, entered around
  the same forward pass: each op's FLOPs are the growth of its total while that
  op runs, so the totals are *exactly* what ``FlopCounterMode`` reports. They
  are FLOPs, not MACs: one multiply-add counts 2 (a 1x1 convolution of C_in to
  C_out channels over H x W positions is 2*C_in*C_out*H*W FLOPs). Only the ops
  ``flop_counter`` has formulas for (matrix products, convolutions, attention)
  count; element-wise ops, normalisation and pooling count 0.
* The pass runs under ``torch.no_grad()`` and the model's buffers (batch-norm
  running statistics) are restored afterwards, so analysing leaves the model as
  it was. It runs in the model's current mode: call ``model.eval()`` first to
  analyse inference (dropout, batch norm with running statistics).
* On the meta device (or with fake tensors) ops compute shapes only, so a
  7-billion-parameter model is analysed in well under a second on a laptop.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ModuleRecord",
    "OpRecord",
    "OpsReport",
    "analyze_ops",
    "analyze_vars",
    "main",
    "profile_ops",
    "tensor_description",
]

_RULE = "---------"


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).rsplit(".", 1)[-1]
    return str(getattr(dtype, "name", dtype))


def tensor_description(var: Any) -> str:
    """Returns a compact string with a tensor's dtype and shape, as TF-Slim does.

    A scalar has an empty shape, so it reads ``'(float32 )'``, exactly as in
    TF-Slim. Anything with ``dtype`` and ``shape`` (a numpy array) works too.

    Example:
        >>> tensor_description(torch.zeros(1, 8, 8, 1024))
        '(float32 1x8x8x1024)'
        >>> tensor_description(torch.tensor(3))
        '(int64 )'
    """
    if not (hasattr(var, "dtype") and hasattr(var, "shape")):
        raise TypeError(
            f"tensor_description: var must be a tensor (something with .dtype and .shape), "
            f"got {type(var).__name__}: {var!r:.80}")
    return "(" + _dtype_name(var.dtype) + " " + "x".join(str(int(s)) for s in var.shape) + ")"


# ---------------------------------------------------------------- variables
def _storage_key(t: torch.Tensor) -> tuple:
    """Identifies the memory a tensor uses, so tied weights count once.

    Meta and fake tensors have no memory to compare, so for them (and for empty
    tensors) only the very same tensor object counts as tied.
    """
    if t.device.type != "meta" and t.numel() > 0 and type(t) in (torch.Tensor, nn.Parameter):
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            ptr = 0
        if ptr:
            return ("storage", t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
    return ("object", id(t))


def _named_tensors(variables: Any, arg: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(variables, torch.Tensor):
        raise TypeError(
            f"{arg}: expected an nn.Module or an iterable of tensors or (name, tensor) pairs, "
            f"got a single tensor {tensor_description(variables)}; pass [tensor] instead")
    if isinstance(variables, Mapping):
        items: Iterable[Any] = variables.items()
    elif isinstance(variables, (str, bytes)) or not isinstance(variables, Iterable):
        raise TypeError(
            f"{arg}: expected an nn.Module or an iterable of tensors or (name, tensor) pairs, "
            f"got {type(variables).__name__}: {variables!r:.80}")
    else:
        items = variables
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            yield f"variable_{i}", item
        elif (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], torch.Tensor)):
            yield item
        else:
            raise TypeError(
                f"{arg}[{i}]: expected a tensor or a (name, tensor) pair, "
                f"got {type(item).__name__}: {item!r:.80}")


def _tabulate_vars(named: Iterable[tuple[str, torch.Tensor]], title: str, kind: str,
                   print_info: bool) -> tuple[int, int]:
    if print_info:
        print(_RULE)
        print(f"{title}: name (type shape) [size]")
        print(_RULE)
    total_size = total_bytes = 0
    first_name: dict[tuple, str] = {}
    for name, var in named:
        key = _storage_key(var)
        if key in first_name:
            if print_info:
                print(name, tensor_description(var), f"[tied to {first_name[key]}, counted once]")
            continue
        first_name[key] = name
        var_size = var.numel()
        var_bytes = var_size * var.element_size()
        total_size += var_size
        total_bytes += var_bytes
        if print_info:
            print(name, tensor_description(var), f"[{var_size}, bytes: {var_bytes}]")
    if print_info:
        print(f"Total size of {kind}: {total_size}")
        print(f"Total bytes of {kind}: {total_bytes}")
    return total_size, total_bytes


def analyze_vars(variables: Any, print_info: bool = False) -> tuple[int, int]:
    """Returns ``(total_size, total_bytes)`` of the variables, optionally printing each.

    ``variables`` is an ``nn.Module`` (its parameters count; its buffers are
    printed in a section of their own and do not count), a mapping of names to
    tensors (a ``state_dict``), or an iterable of tensors or of ``(name, tensor)``
    pairs (what ``slim.variables.get_model_variables()`` returns), all of which
    count. A tensor that appears twice (tied weights) counts once. Tensors on
    the meta device are measured without allocating anything.

    ``print_info=True`` prints TF-Slim's report: a header, one
    ``name (dtype AxB) [size, bytes: N]`` row per variable, then the totals.

    Example:
        >>> analyze_vars(nn.Linear(3, 2), print_info=True)
        ---------
        Variables: name (type shape) [size]
        ---------
        weight (float32 2x3) [6, bytes: 24]
        bias (float32 2) [2, bytes: 8]
        Total size of variables: 8
        Total bytes of variables: 32
        (8, 32)
    """
    if not isinstance(print_info, bool):
        raise TypeError(f"analyze_vars: print_info must be a bool, got {type(print_info).__name__}: {print_info!r}")
    if isinstance(variables, nn.Module):
        result = _tabulate_vars(variables.named_parameters(remove_duplicate=False),
                                "Variables", "variables", print_info)
        buffers = list(variables.named_buffers())
        if print_info and buffers:
            _tabulate_vars(buffers, "Buffers", "buffers", print_info)
        return result
    return _tabulate_vars(list(_named_tensors(variables, "analyze_vars: variables")),
                          "Variables", "variables", print_info)


# ---------------------------------------------------------------- ops
@dataclasses.dataclass(frozen=True)
class OpRecord:
    """One aten op executed by the forward pass.

    ``name`` is TF-Slim's op name, ``module/op`` (``op``, ``op_1``, ... when a
    module runs the same op again); ``outputs`` holds ``(dtype, shape)`` of each
    tensor output; ``size`` is their total number of elements (TF-Slim's figure);
    ``flops`` is counted by ``torch.utils.flop_counter`` (FLOPs, not MACs).
    """

    name: str
    op: str
    module: str
    outputs: tuple[tuple[torch.dtype, tuple[int, ...]], ...]
    size: int
    flops: int

    def description(self) -> str:
        """The outputs as TF-Slim prints them: ``'(float32 1x2), (int64 1x2)'``."""
        return ", ".join("(" + _dtype_name(d) + " " + "x".join(map(str, s)) + ")" for d, s in self.outputs)


@dataclasses.dataclass
class ModuleRecord:
    """One module the forward pass entered, with totals over everything it ran.

    ``name`` is the qualified name (``''`` for the model itself); ``parameters``
    counts the module's own and its children's parameters (tied ones once);
    ``flops`` and ``op_size`` sum the ops run inside it, its children included;
    ``output_elements`` sums the elements of the tensors its forward returned,
    over its ``calls``.
    """

    name: str
    type: str
    depth: int
    parameters: int
    flops: int = 0
    op_size: int = 0
    output_elements: int = 0
    calls: int = 0


@dataclasses.dataclass
class OpsReport:
    """What :func:`profile_ops` measured: ops in execution order, modules in order of first entry."""

    ops: list[OpRecord]
    modules: list[ModuleRecord]

    @property
    def total_size(self) -> int:
        """TF-Slim's figure: the number of elements of all op outputs."""
        return sum(op.size for op in self.ops)

    @property
    def total_flops(self) -> int:
        """FLOPs (not MACs) of the forward pass, as ``torch.utils.flop_counter`` counts them."""
        return sum(op.flops for op in self.ops)

    def format(self) -> str:
        """The printed report: TF-Slim's op rows, then FLOPs by op and the module table."""
        lines = [_RULE, "Operations: name -> (type shapes) [size]", _RULE]
        # TF-Slim prints `print(name, '\t->', shapes, '[size]')`: its separators kept exactly.
        lines += [f"{op.name} \t-> {op.description()} [{op.size}]" for op in self.ops]
        lines.append(f"Total size of ops outputs: {self.total_size}")
        flop_ops = [op for op in self.ops if op.flops]
        lines += [_RULE, "FLOPs: name [FLOPs] (FLOPs, not MACs: a multiply-add counts 2)", _RULE]
        lines += [f"{op.name} [{op.flops}]" for op in flop_ops]
        lines.append(f"Total FLOPs: {self.total_flops}")
        lines += [_RULE, "Modules: parameters, FLOPs and output elements (children included)", _RULE]
        rows = [("module", "type", "parameters", "FLOPs", "outputs")]
        for m in self.modules:
            rows.append(("  " * m.depth + (m.name or "(model)"), m.type, str(m.parameters), str(m.flops),
                         str(m.output_elements)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])]
                                   + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]).rstrip())
        return "\n".join(lines)


# Queries of a tensor's metadata reach a dispatch mode only for some tensor subclasses;
# they are not ops of the model.
_METADATA_OPS = {
    getattr(torch.ops.aten, name).default
    for name in ("size", "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset",
                 "numel", "sym_numel", "dim", "is_contiguous", "sym_is_contiguous",
                 "is_strides_like_format", "is_non_overlapping_and_dense")
    if hasattr(torch.ops.aten, name)
}


def _extra_flop_formulas() -> dict:
    """Formulas ``flop_counter`` lacks, so that real CPU tensors count what meta tensors count.

    On CPU, ``scaled_dot_product_attention`` runs the fused
    ``_scaled_dot_product_flash_attention_for_cpu`` kernel, for which
    ``flop_counter`` (up to torch 2.13 at least) has no formula, so attention
    would count 0 FLOPs there; on meta the math path runs and its ``bmm``s count.
    That kernel takes ``(query, key, value, ...)`` like the other attention
    kernels, so ``flop_counter``'s own ``sdpa_flop`` formula applies unchanged.
    """
    extra: dict = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    # The registry holds formulas already wrapped to take tensors; mark ours "raw" so it is not wrapped twice.
    sdpa = flop_counter.flop_registry.get(torch.ops.aten._scaled_dot_product_flash_attention)
    if op is not None and sdpa is not None and op not in flop_counter.flop_registry:
        def cpu_flash_attention_flop(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
            return sdpa(*args, out_val=out_val, **kwargs)

        cpu_flash_attention_flop._get_raw = True  # type: ignore[attr-defined]
        extra[op] = cpu_flash_attention_flop
    return extra


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, Mapping):
        for x in obj.values():
            yield from _tensors(x)


class _OpRecorder(TorchDispatchMode):
    """Records each aten op under the module stack; FLOPs are read off the FlopCounterMode below it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.stack: list[ModuleRecord] = []
        self.ops: list[OpRecord] = []
        self._seen: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS:
            return func(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        flops = self.counter.get_total_flops() - before
        packet = func.overloadpacket
        ns = getattr(packet, "_qualified_op_name", "aten::").split("::")[0]
        op = packet.__name__ if ns == "aten" else f"{ns}.{packet.__name__}"
        scope = self.stack[-1].name if self.stack else ""
        base = f"{scope}/{op}" if scope else op
        count = self._seen.get(base, 0)
        self._seen[base] = count + 1
        outputs = tuple((t.dtype, tuple(int(s) for s in t.shape)) for t in _tensors(out))
        size = 0
        for _, shape in outputs:
            n = 1
            for s in shape:
                n *= s
            size += n
        self.ops.append(OpRecord(base if count == 0 else f"{base}_{count}", op, scope, outputs, size, flops))
        for record in self.stack:
            record.flops += flops
            record.op_size += size
        return out


def _example_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError(f"profile_ops: example_inputs as a mapping must have str keys (keyword arguments), "
                            f"got keys {list(example_inputs)!r:.80}")
        return (), dict(example_inputs)
    raise TypeError(
        "profile_ops: example_inputs must be a tensor, a tuple/list of positional arguments or a dict of "
        f"keyword arguments, got {type(example_inputs).__name__}: {example_inputs!r:.80}")


def _reraise_in(exc: BaseException, where: ModuleRecord | None) -> None:
    place = f"module {where.name!r} ({where.type})" if where and where.name else (
        f"the model's own forward ({where.type})" if where else "the model")
    message = f"analyze_ops: the forward pass failed in {place}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:  # an exception type whose constructor wants other arguments
        if hasattr(exc, "add_note"):
            exc.add_note(message)
        raise exc from None
    raise new from exc


def profile_ops(model: Callable[..., Any], example_inputs: Any) -> OpsReport:
    """Runs one forward pass and returns its ops, FLOPs and module table as data.

    ``example_inputs`` is one tensor, a tuple/list of positional arguments or a
    dict of keyword arguments. See the module docstring for how ops are recorded.
    If the inputs don't fit the model, the model's own exception is raised again,
    same type, naming the module where it failed and chained from the original.

    Example:
        >>> report = profile_ops(nn.Linear(3, 2), torch.zeros(1, 3))
        >>> [(op.name, op.size, op.flops) for op in report.ops]
        [('t', 6, 0), ('addmm', 2, 12)]
        >>> report.modules[0]
        ModuleRecord(name='', type='Linear', depth=0, parameters=8, flops=12, op_size=8, output_elements=2, calls=1)
    """
    if not callable(model):
        raise TypeError(f"profile_ops: model must be an nn.Module (or a callable), got {type(model).__name__}")
    args, kwargs = _example_args(example_inputs)

    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    recorder = _OpRecorder(counter)
    records: dict[nn.Module, ModuleRecord] = {}
    order: list[ModuleRecord] = []
    handles = []
    saved_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    if isinstance(model, nn.Module):
        names = {m: name for name, m in model.named_modules()}

        def pre_hook(module: nn.Module, _inputs: Any) -> None:
            record = records.get(module)
            if record is None:
                name = names[module]
                record = ModuleRecord(
                    name=name, type=type(module).__name__, depth=name.count(".") + 1 if name else 0,
                    parameters=sum(p.numel() for p in module.parameters()))
                records[module] = record
                order.append(record)
            record.calls += 1
            recorder.stack.append(record)

        def post_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            record = records[module]
            record.output_elements += sum(t.numel() for t in _tensors(output))
            # Pop back to this module: a child whose exception the parent caught never popped itself.
            while recorder.stack and recorder.stack.pop() is not record:
                pass

        for module in names:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        with torch.no_grad():
            saved_buffers = [(b, b.clone()) for b in model.buffers() if b.device.type != "meta"]

    try:
        with torch.no_grad(), counter, recorder:
            model(*args, **kwargs)
    except Exception as exc:
        _reraise_in(exc, recorder.stack[-1] if recorder.stack else None)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)
    return OpsReport(ops=recorder.ops, modules=order)


def analyze_ops(model: Callable[..., Any], example_inputs: Any, print_info: bool = False) -> int:
    """Returns TF-Slim's figure: the total number of elements of all op outputs.

    The ops are the aten ops one forward pass of ``model`` on ``example_inputs``
    executes (see the module docstring). ``print_info=True`` prints one row per
    op in execution order, ``module/op \\t-> (dtype shape) [size]`` as TF-Slim
    prints its graph's ops, then FLOPs per op, the total FLOPs (FLOPs, not MACs)
    and a table of modules (parameters, FLOPs, output elements). The same
    figures are returned as data by :func:`profile_ops`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> analyze_ops(model, torch.zeros(1, 3))   # t: 3x2, addmm: 1x2, relu: 1x2
        10
    """
    if not isinstance(print_info, bool):
        raise TypeError(f"analyze_ops: print_info must be a bool, got {type(print_info).__name__}: {print_info!r}")
    report = profile_ops(model, example_inputs)
    if print_info:
        print(report.format())
    return report.total_size


# ---------------------------------------------------------------- command line
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-negative integers such as 1,3,224,224, got {text!r}")
    return shape


def _load_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"FACTORY must look like PACKAGE.MODULE:FACTORY (e.g. torchslim.demo:DigitsNet), got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, expected a callable returning an nn.Module")
    needed = _required_arguments(obj)
    if needed:
        raise ValueError(
            f"{spec} cannot be built without arguments: it needs {', '.join(needed)}. Point FACTORY at a function "
            f"that takes none and returns the model (e.g. def build(): return {attr.rsplit('.', 1)[-1]}(...))")
    return obj


def _required_arguments(fn: Callable[..., Any]) -> list[str]:
    """The parameters ``fn()`` would be missing (empty when its signature cannot be read)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           inspect.Parameter.KEYWORD_ONLY)]


def _si(value: float, unit: str) -> str:
    """``675.07 kFLOPs``: a count with a k/M/G/T prefix (exact below 1000).

    Example:
        >>> _si(675072, 'FLOPs'), _si(1.8e9, 'FLOPs'), _si(12, 'MACs')
        ('675.07 kFLOPs', '1.80 GFLOPs', '12 MACs')
    """
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:g} {unit}"


def main(argv: list[str]) -> int:
    """``torchslim analyze``: prints a model's variables report and, with ``--ops``, its ops report.

    The model is ``FACTORY()`` built under ``torch.device(--device)`` (on
    ``meta`` nothing is allocated), cast to ``--dtype`` if that is a floating
    type, and put in eval mode. Example inputs of each ``--input-shape`` are
    zeros (random normals for floating types off the meta device) of ``--dtype``.

    Example:
        >>> main(['torchslim.demo:DigitsNet', '--device', 'meta'])  # doctest: +ELLIPSIS
        Model: torchslim.demo:DigitsNet (DigitsNet) on meta
        ---------
        Variables: name (type shape) [size]
        ...
        0
    """
    from torchslim.cli import ArgumentParser

    parser = ArgumentParser(
        prog="torchslim analyze",
        description="Report a model's variables (parameters and buffers) and, with --ops, the ops, "
                    "output sizes and FLOPs (not MACs) of one forward pass.")
    parser.add_argument("factory", metavar="PACKAGE.MODULE:FACTORY",
                        help="a callable taking no argument and returning an nn.Module, "
                             "e.g. torchslim.demo:DigitsNet (the demo's network, --input-shape 1,1,8,8)")
    parser.add_argument("--input-shape", type=_shape, action="append", default=None, metavar="N,C,H,W",
                        help="shape of an example input; repeat for a model taking several inputs")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES,
                        help="dtype of the inputs, and of the model when floating (default: float32)")
    parser.add_argument("--ops", action="store_true", help="also run one forward pass and report its ops")
    parser.add_argument("--device", default="cpu",
                        help="device to build the model on; 'meta' allocates nothing (default: cpu)")
    args = parser.parse_args(list(argv))
    if args.ops and not args.input_shape:
        parser.error("--ops needs --input-shape (e.g. --input-shape 1,3,224,224)")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    try:
        factory = _load_factory(args.factory)
    except ValueError as exc:
        parser.error(str(exc))
    dtype = getattr(torch, args.dtype)

    with device:
        model = factory()
    if not isinstance(model, nn.Module):
        print(f"torchslim analyze: error: {args.factory} returned a {type(model).__name__}, expected an nn.Module",
              file=sys.stderr)
        return 2
    if dtype.is_floating_point:
        model = model.to(dtype)
    model.eval()

    print(f"Model: {args.factory} ({type(model).__name__}) on {device}")
    analyze_vars(model, print_info=True)
    if args.ops:
        if dtype.is_floating_point and device.type != "meta":
            inputs = [torch.randn(s, dtype=dtype, device=device) for s in args.input_shape]
        else:
            inputs = [torch.zeros(s, dtype=dtype, device=device) for s in args.input_shape]
        try:
            report = profile_ops(model, inputs)
        except Exception as exc:  # the model's own error, already naming the module
            print(f"torchslim analyze: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        print(report.format())
        # flop_counter counts 2 FLOPs per multiply-add in every op it knows (matmuls, convolutions,
        # attention), so MACs are exactly half; ops it has no formula for count neither.
        flops = report.total_flops
        print(f"Forward pass: {_si(flops, 'FLOPs')} = {_si(flops / 2, 'MACs')} (multiply-adds), "
              f"{report.total_size:,} op output elements")
    return 0
