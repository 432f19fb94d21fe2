"""PyTorch module -> ONNX file through torch.onnx (legacy TorchScript or dynamo exporter), quietly."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"
# Protobuf cannot serialize a message over 2 GiB: bigger models keep their weights in a .data file.
PROTOBUF_LIMIT = 2**31 - 1


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress and warn about tracing; keep that out of the user's output."""
    import torch

    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Said of models in training mode; ours is in eval mode, where folding is safe.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding be turned off")
        yield
    if buffer.getvalue().strip():
        logger.debug("exporter output:\n%s", buffer.getvalue().strip())


def torch_export(model, input_shape, config, path: Path, name: str) -> None:
    """Export with `config`'s exporter / opset / dynamic batch (an ExportConfig) to `path`."""
    import torch

    batch = config.check_batch if config.dynamic_batch else 1
    # A batch of 1 would let torch.export specialize the batch dimension away.
    example = torch.randn(max(batch, 2) if config.dynamic_batch else 1, *input_shape)
    large = _param_bytes(model) > PROTOBUF_LIMIT
    try:
        with _quiet_exporter(), torch.no_grad():
            if config.exporter == "legacy":
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if config.dynamic_batch
                    else None,
                    opset_version=config.opset, dynamo=False, do_constant_folding=True,
                    # PRESERVE (the model is in eval mode) keeps BatchNormalization as its own node instead
                    # of folding it into the conv, so ONNX weights stay byte-equal to the pruned parameters.
                    training=torch.onnx.TrainingMode.PRESERVE,
                )
            else:
                shapes = ({0: torch.export.Dim(BATCH_DIM)},) if config.dynamic_batch else None
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=shapes, opset_version=config.opset, dynamo=True, external_data=large,
                    verbose=False,
                )
    except MpdeployError:
        raise
    except Exception as exc:
        other = "dynamo" if config.exporter == "legacy" else "legacy"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise MpdeployError(
            f"the {config.exporter} ONNX exporter failed on {name} ({type(exc).__name__}: {first}); "
            f"try --exporter {other} or another --opset"
        ) from exc


def bypass_weight_identities(model_proto) -> int:
    """Drop Identity nodes that only forward an initializer (the legacy exporter's de-duplication):
    Polygraphy does not look through Identity, and they carry no computation."""
    graph = model_proto.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rename = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(rename)
