"""Two verdicts on an ONNX model's 2:4 weights, for tests that compare them (test_export, test_precision).

Both return ({tensor: axis} of the weights checked, {tensor} of those found 2:4 sparse):

    assert polygraphy_check(proto) == ours(proto)
"""

from __future__ import annotations

from mpdeploy.onnx.trt_rules import check_trt_sparsity


def polygraphy_check(model_proto) -> tuple[dict[str, int], set[str]]:
    """Polygraphy's `inspect sparsity`, through its Python API: exactly `SparsityPruner.process(check=True)`
    (its placement walk, then `process_tensor` per candidate), returning {tensor: axis} checked and the
    set it reports sparse."""
    from polygraphy.logger import G_LOGGER
    from polygraphy.tools.sparse import SparsityPruner, process_tensor

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        pruner = SparsityPruner(model_proto)
        infos = pruner._walk_nodes()
        inits = {t.name: t for t in model_proto.graph.initializer}
        sparse = {i.name for i in infos if process_tensor(i, inits[i.name], True)}
    return {i.name: i.axis for i in infos}, sparse


def ours(model_proto) -> tuple[dict[str, int], set[str]]:
    """Our TensorRT-rule checker (`check_trt_sparsity`) in the same shape: eligible tensors and the 2:4 ones."""
    report = check_trt_sparsity(model_proto)
    eligible = {k: v["axis"] for k, v in report.items() if v["eligible"]}
    return eligible, {k for k in eligible if report[k]["is_2_4"]}
