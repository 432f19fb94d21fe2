"""Prunable layers for programs without Python modules: torch.export `.pt2` and TorchScript.

`program.module()` of an ExportedProgram is an fx GraphModule whose convolutions and matmuls are
`aten.conv2d` / `aten.linear` calls on `get_attr` weights (a traced TorchScript program's convolutions
come through its converter as `aten.convolution`). `lift_layers` rewrites each such call into
a real `nn.Conv2d` / `nn.Linear` submodule that owns those same parameters, at the weight's own path
(so `c1.weight` stays `c1.weight`). Everything downstream (layer discovery, MAC-counting and
calibration hooks, masks, ONNX export, restore, distillation) then works unchanged. TorchScript goes
through torch's TorchScript -> ExportedProgram converter first.

Rebuilding for a later stage re-opens the same file (checked by its sha256) and lifts again: the
rewrite is deterministic, so the pruned state dict loads strictly.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import fx, nn

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def torch_quiet():
    """torch.export / its converters log tracebacks and shape notes, and warn, while loading: the user
    gets mpdeploy's one line instead. (`disabled` is per logger, so every torch logger is switched.)"""
    import warnings

    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    saved = [(logging.getLogger(n), logging.getLogger(n).disabled) for n in names]
    for lg, _ in saved:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in saved:
            lg.disabled = was


_CONV = "aten.conv2d.default"
_LINEAR = "aten.linear.default"
# What a *traced* TorchScript program's `aten::_convolution` becomes after conversion:
# (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups).
_CONVOLUTION = "aten.convolution.default"
_LIFTABLE = (_CONV, _LINEAR, _CONVOLUTION)
# Ops that multiply by a weight: any of these left on a parameter after lifting is a layer mpdeploy
# cannot see (so cannot prune, and would silently keep dense).
_WEIGHT_OPS = (*_LIFTABLE, "aten.addmm.default", "aten.mm.default", "aten.matmul.default", "aten.conv1d.default",
               "aten.conv3d.default", "aten._convolution.default")


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    # torch.export keeps weights as parameters; the TorchScript converter makes them buffers.
    for getter in (gm.get_parameter, gm.get_buffer):
        try:
            return getter(node.target)
        except AttributeError:
            continue
    return None


def _layer_for(node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    target = str(node.target)
    if target == _CONVOLUTION:
        args = list(node.args) + [None] * (9 - len(node.args))
        stride, padding, dilation, transposed, output_padding, groups = args[3:9]
        if transposed or any(output_padding or []) or weight.dim() != 4 or isinstance(padding, str):
            return None
        return _conv2d(weight, bias, stride or [1, 1], padding or [0, 0], dilation or [1, 1], groups or 1)
    if target == _LINEAR and weight.dim() == 2:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif target == _CONV and weight.dim() == 4:
        args = list(node.args) + [None] * (7 - len(node.args))
        stride, padding, dilation, groups = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1)
        stride, padding, dilation, groups = (node.kwargs.get("stride", stride), node.kwargs.get("padding", padding),
                                             node.kwargs.get("dilation", dilation), node.kwargs.get("groups", groups))
        if isinstance(padding, str):
            return None
        return _conv2d(weight, bias, stride, padding, dilation, groups)
    else:
        return None
    return _share(layer, weight, bias)


def _conv2d(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups) -> nn.Module:
    layer = nn.Conv2d(weight.shape[1] * int(groups), weight.shape[0], tuple(weight.shape[2:]), stride=tuple(stride),
                      padding=tuple(padding), dilation=tuple(dilation), groups=int(groups), bias=bias is not None)
    return _share(layer, weight, bias)


def _share(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Share the program's own Parameter objects: the layer's weight *is* the program's weight."""
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=True)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=True)
    return layer


def unlifted_weight_ops(gm: fx.GraphModule) -> int:
    """How many weight-multiplying ops still read a parameter directly (not lifted into a layer)."""
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and str(node.target) in _WEIGHT_OPS
               and any(_attr(gm, a) is not None for a in node.args[1:3]))


def lift_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule where every aten linear / conv2d on parameters calls an nn module."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = len(node.users)
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in _LIFTABLE:
            continue
        w_node = node.args[1] if len(node.args) > 1 else None
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight, bias = _attr(gm, w_node), _attr(gm, b_node)
        if weight is None or uses.get(w_node.target, 0) != 1 or (b_node is not None and bias is None):
            continue
        path = w_node.target.rsplit(".", 1)[0] if "." in w_node.target else f"lifted_{lifted}"
        parent = gm.get_submodule(path) if "." in w_node.target else None
        own = {**dict(parent.named_parameters(recurse=False)), **dict(parent.named_buffers(recurse=False))} \
            if parent is not None else {}
        expect = {w_node.target.rsplit(".", 1)[-1]} | ({b_node.target.rsplit(".", 1)[-1]} if bias is not None else set())
        if parent is None or set(own) != expect or list(parent.children()) or not w_node.target.endswith(".weight") or \
                (bias is not None and b_node.target != f"{path}.bias"):
            continue  # weights not laid out as one plain layer: leave the op as it is (kept dense)
        layer = _layer_for(node, weight, bias)
        if layer is None:
            continue
        _set_submodule(gm, path, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        lifted += 1
    _dynamic_sizes(gm)
    gm.graph.eliminate_dead_code()
    plain = fx.GraphModule(gm, gm.graph)
    plain.recompile()
    logger.info("lifted %d linear / conv2d ops into modules", lifted)
    return plain


def _dynamic_sizes(gm: fx.GraphModule) -> None:
    """`aten.sym_size.int(x, d)` -> `x.size(d)`: the legacy ONNX exporter traces the graph, and a size
    read by an aten call is a plain int to the tracer (the batch would be baked into every reshape),
    while `Tensor.size` is traced as a shape op."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and str(node.target) == "aten.sym_size.int":
            with gm.graph.inserting_before(node):
                call = gm.graph.call_method("size", tuple(node.args))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        elif node.op == "call_function" and str(node.target) in ("aten.reshape.default", "aten.view.default"):
            # The tracer follows traced sizes through Tensor.reshape / .view, not through aten op calls.
            method = str(node.target).split(".")[1]
            with gm.graph.inserting_before(node):
                call = gm.graph.call_method(method, (node.args[0], *node.args[1]))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the shape-guard call torch.export adds, so other batch sizes can run if the graph allows."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def program_module(program, input_shape: tuple[int, ...] | None, what: str) -> nn.Module:
    """The lifted, batch-flexible module of an ExportedProgram."""
    gm = program.module()
    try:
        _drop_guards(gm)
    except Exception as exc:  # the guard call is an implementation detail of torch.export
        logger.debug("could not drop export guards: %s", exc)
    plain = lift_layers(gm)
    if input_shape is not None:
        _check_batch(plain, input_shape, what)
    return plain.eval()


def _check_batch(module: nn.Module, input_shape: tuple[int, ...], what: str) -> None:
    # fx prints its own traceback to stderr when a GraphModule call fails: keep it to the one error line.
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        for batch in (1, 3):
            try:
                module(torch.zeros(batch, *input_shape))
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                raise MpdeployError(
                    f"{what} does not run a batch of {batch} at input {','.join(map(str, input_shape))} "
                    f"({type(exc).__name__}: {first}); export it with a dynamic batch dimension "
                    "(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))) "
                    "or save a state_dict / safetensors and pass --arch"
                ) from None


def torchscript_module(script: torch.jit.ScriptModule, input_shape: tuple[int, ...], what: str) -> nn.Module:
    """Convert TorchScript to an ExportedProgram (dynamic batch when possible) and lift its layers."""
    from torch._export.converter import TS2EPConverter

    example = (torch.zeros(2, *input_shape),)
    try:
        with torch_quiet():
            program = TS2EPConverter(script, example).convert()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MpdeployError(
            f"{what}: torch cannot convert this TorchScript program to a graph mpdeploy can prune "
            f"({type(exc).__name__}: {first}); save a state_dict / safetensors with --arch, or a torch.export .pt2"
        ) from None
    gm = program.module()
    try:
        _drop_guards(gm)
    except Exception as exc:
        logger.debug("could not drop export guards: %s", exc)
    plain = lift_layers(gm)
    left = unlifted_weight_ops(plain)
    if left:
        lifted = sum(1 for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        raise MpdeployError(
            f"{what}: {left} of {left + lifted} conv / linear ops in this TorchScript program could not be lifted into "
            "layers mpdeploy can prune (they would stay dense, unseen); save it with torch.jit.script, as a "
            "torch.export .pt2, or as a state_dict / safetensors with --arch"
        )
    _check_batch(plain, input_shape, what)
    return plain.eval()
