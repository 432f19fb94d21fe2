"""Sparsity only where it pays (issue 27), without a GPU: prune for a backend, give back what ran dense, gate on speed.

The TensorRT evidence is a recorded build log in the format TensorRT prints (Polygraphy's captured "[V] "
lines, TensorRT 10 layer names = ONNX node names; see tests/test_trt_report.py for the sources), written
for the ONNX this test exports; the torch evidence is torch's conversion plan, computed on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mpdeploy.core import artifacts
from mpdeploy.audit.common import Findings
from mpdeploy.audit.config import AuditConfig
from mpdeploy.audit.verdict import speed_gate
from mpdeploy.cli import main as cli_main
from mpdeploy.densify.evidence import (
    NOT_ELIGIBLE,
    NOT_PICKED,
    add_slow_layers,
    read_slow_layers,
    torch_evidence,
    trt_evidence,
)
from mpdeploy.densify.stage import DensifyConfig, densify
from mpdeploy.densify.weights import densify_records
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import open_weights

MODEL = ["timm:resnet10t", "--weights", "random", "--input-shape", "1,32,32", "--num-classes", "10",
         "--model-kwargs", "in_chans=1"]


def _trt_log(eligible: list[str], picked: list[str]) -> str:
    """A TensorRT verbose build log as Polygraphy captures it; fused layers read "<conv> + <relu>"."""
    fuse = lambda node: f"{node} + {node.rsplit('/', 1)[0]}/Relu"  # noqa: E731
    return ("[V] Building engine\n"
            f"[V] (Sparsity) Layers eligible for sparse math: {', '.join(fuse(n) for n in eligible)}\n"
            f"[V] (Sparsity) TRT inference plan picked sparse implementation for layers: "
            f"{', '.join(fuse(n) for n in picked)}\n"
            "[V] Engine built\n")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """pruned/ (every layer TensorRT allows: uniform budget, no backend), onnx/, engine-ort/ of resnet10t."""
    from mpdeploy.backends.base import BuildConfig
    from mpdeploy.engine.stage import build_engines
    from mpdeploy.export.stage import ExportConfig, export

    root = tmp_path_factory.mktemp("densify") / "r10t"
    assert cli_main(["-q", "prune", *MODEL, "--budget", "uniform", "--out", str(root / "pruned")]) == 0
    export(root / "pruned", ExportConfig(), root / "onnx")
    build_engines(root / "onnx", "ort", BuildConfig(batch_sizes=(1, 2), threads=1))
    return {"root": root, "pruned": root / "pruned", "onnx": root / "onnx", "engine": root / "engine-ort"}


def _consumers(onnx_dir: Path) -> dict[str, str]:
    tensors = json.loads((onnx_dir / "sparsity.json").read_text())["tensors"]
    return {t["layer"]: t["consumer"] for t in tensors if t["runs_sparse"]}


def _check_densified(out: Path, source: Path, returned: set[str]) -> None:
    """Exactly `returned` carry the dense source's tensors (bit for bit) and no mask; the rest is untouched."""
    new, old = open_weights(out), open_weights(source)  # both verified with their chains
    state, sparse = load_file(str(new.weights_file("sparse"))), load_file(str(old.weights_file("sparse")))
    dense = load_file(str(old.weights_file("dense")))
    masks, old_masks = load_file(str(new.masks_file)), load_file(str(old.masks_file))
    assert set(state) == set(sparse)
    for key, value in state.items():
        layer = key.rsplit(".", 1)[0]
        expected = dense[key] if layer in returned else sparse[key]
        assert torch.equal(value, expected), key
    assert set(masks) == set(old_masks) - {f"{n}.weight" for n in returned}
    assert all(torch.equal(masks[k], old_masks[k]) for k in masks)
    assert artifacts.sha256_file(new.weights_file("dense")) == artifacts.sha256_file(old.weights_file("dense"))
    layers = {r["name"]: r for r in new.layers}
    for name in returned:
        assert layers[name]["pattern"] is None and not layers[name]["runs_sparse"]
        assert layers[name]["skipped"].startswith("densified: ") and layers[name]["densified"]["was"] == "2:4"
        assert layers[name]["macs_executed"] == layers[name]["macs"]
    assert {r["layer"] for r in new.manifest["densify"]["returned"]} == returned
    still = {r["name"] for r in old.layers if r["pattern"]} - returned
    assert {r["name"] for r in new.layers if r["pattern"]} == still
    assert new.totals["pruned_layers"] == old.totals["pruned_layers"] - len(returned)
    assert new.totals["sparse_execution_mac_reduction"] < old.totals["sparse_execution_mac_reduction"]


def test_recorded_trt_log_gives_back_exactly_the_eligible_layers_not_picked(chain, tmp_path):
    consumers = _consumers(chain["onnx"])
    layers = sorted(consumers)
    assert len(layers) >= 6
    not_picked = set(layers[::3])  # every third eligible layer: TensorRT kept the dense kernel
    log = tmp_path / "build.log"
    log.write_text(_trt_log([consumers[n] for n in layers], [consumers[n] for n in layers if n not in not_picked]))
    out = tmp_path / "densified"
    # The engine is the source: its ONNX's sparsity.json maps TensorRT's names back to PyTorch layers.
    result = densify(chain["engine"], DensifyConfig(trt_log=str(log)), out=out)
    assert result.path == out
    assert set(result.returned) == not_picked and all(v == NOT_PICKED for v in result.returned.values())
    _check_densified(out, chain["pruned"], not_picked)
    manifest = artifacts.read_manifest(out, "pruned")
    assert set(manifest["sources"]) == {"weights", "engine"}
    assert (out / manifest["sources"]["engine"]["path"]).resolve() == chain["engine"].resolve()
    assert manifest["inputs"]["trt_log"] == artifacts.sha256_file(log)
    assert manifest["densify"]["evidence"]["source"] == "tensorrt build log (picked list)"
    assert manifest["config"]["densify"]["trt_log"] == str(log)


def test_inspector_json_without_sparsity_lines(chain, tmp_path):
    # TensorRT 11 may no longer print the "(Sparsity)" lines: the engine inspector's JSON (DETAILED verbosity,
    # layer Metadata "[ONNX Layer: ...]", tactic names) is read instead, and the record says it is a heuristic.
    consumers = _consumers(chain["onnx"])
    dense = set(sorted(consumers)[1::2])
    layers = [{"Name": f"{node} + {node.rsplit('/', 1)[0]}/Relu", "LayerType": "CaskConvolution",
               "Metadata": f"[ONNX Layer: {node}]",
               "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16" if layer in dense
               else "sm80_xmma_fprop_sparse_conv_interior_nhwckrsc_nhwc_f16f16"}
              for layer, node in consumers.items()]
    report = tmp_path / "sparse.layers.json"
    report.write_text(json.dumps({"Layers": layers, "I/O Tensors": []}))
    result = densify(chain["onnx"], DensifyConfig(trt_log=str(report)), out=tmp_path / "out")
    assert set(result.returned) == dense and "heuristic" in result.evidence.source
    _check_densified(tmp_path / "out", chain["pruned"], dense)
    assert set(artifacts.read_manifest(tmp_path / "out", "pruned")["sources"]) == {"weights", "onnx"}


def test_trt_evidence_pure():
    tensors = [{"layer": "a", "consumer": "/a/Conv"}, {"layer": "b", "consumer": "/b/Conv"},
               {"layer": "c", "consumer": "/c/Gemm"}, {"layer": "d", "consumer": "/d/Conv"}]
    report = {"eligible": ["/a/Conv + /a/Relu", "/b/Conv", "/c/Gemm [profile 0]"], "picked_sparse": ["/a/Conv + /a/Relu"],
              "layers": [{"name": "/c/Gemm [profile 0]", "onnx_nodes": ["/c/Gemm"]}]}
    evidence = trt_evidence(report, tensors, ["a", "b", "c", "d"])
    assert evidence.ran_sparse == ["a"]
    assert evidence.ran_dense == {"b": NOT_PICKED, "c": NOT_PICKED, "d": NOT_ELIGIBLE}
    # "/a/Conv" must not match inside "/x/a/Conv" (a prefix is not the node).
    evidence = trt_evidence({"eligible": ["/x/a/Conv"], "picked_sparse": ["/x/a/Conv"], "layers": []},
                            [{"layer": "a", "consumer": "/a/Conv"}, {"layer": "x", "consumer": "/x/a/Conv"}], ["a", "x"])
    assert evidence.ran_sparse == ["x"] and evidence.ran_dense == {"a": NOT_ELIGIBLE}
    # A Myelin region hides which layers inside it ran sparse: unknown, kept sparse.
    evidence = trt_evidence({"eligible": ["{ForeignNode[/a/Conv.../b/Conv]}"], "picked_sparse":
                             ["{ForeignNode[/a/Conv.../b/Conv]}"], "layers": []}, tensors[:2], ["a", "b"])
    assert not evidence.ran_dense and set(evidence.unknown) == {"a", "b"}
    # Names that match no pruned layer at all: refuse rather than give everything back.
    with pytest.raises(MpdeployError, match="none of TensorRT's layer names"):
        trt_evidence({"eligible": ["conv1", "conv2"], "picked_sparse": ["conv2"], "layers": []}, tensors, ["a", "b"])
    with pytest.raises(MpdeployError, match="does not say which layers ran sparse"):
        trt_evidence({"eligible": None, "picked_sparse": None, "layers": []}, tensors, ["a"])
    # Without the picked line, the inspector's tactic names decide (and the source says it is a heuristic).
    inspector = [{"name": "/a/Conv", "tactic": "sm80_xmma_fprop_sparse_conv", "sparse_tactic": True, "onnx_nodes": []},
                 {"name": "/b/Conv", "tactic": "sm80_xmma_fprop_implicit_gemm", "sparse_tactic": False, "onnx_nodes": []}]
    evidence = trt_evidence({"eligible": None, "picked_sparse": None, "layers": inspector}, tensors, ["a", "b"])
    assert evidence.ran_sparse == ["a"] and set(evidence.ran_dense) == {"b"} and "heuristic" in evidence.source
    # ... and a layer the inspector does not name at all is unknown (kept sparse), not "ran dense".
    evidence = trt_evidence({"eligible": None, "picked_sparse": None, "layers": inspector}, tensors, ["a", "b", "c"])
    assert set(evidence.ran_dense) == {"b"} and set(evidence.unknown) == {"c"}


def test_torch_evidence_and_slow_layers(tmp_path):
    evidence = torch_evidence(["fc1", "fc2"], [{"layer": "conv", "reason": "k x k conv"}], ["conv", "fc1", "fc2"])
    assert evidence.ran_sparse == ["fc1", "fc2"] and evidence.ran_dense == {"conv": "torch did not convert it: k x k conv"}
    for text in ('["fc2"]', '{"slow_layers": ["fc2"]}', '{"layers": [{"layer": "fc2", "dense_ms": 1.0}]}',
                 "# slower than dense on the H200\nfc2\n"):
        (tmp_path / "slow").write_text(text)
        assert read_slow_layers(tmp_path / "slow") == ["fc2"]
    add_slow_layers(evidence, ["fc2"], "slow.json")
    assert evidence.ran_sparse == ["fc1"] and "timed slower" in evidence.ran_dense["fc2"]
    with pytest.raises(MpdeployError, match="not a pruned layer this engine ran sparse"):
        add_slow_layers(evidence, ["nope"], "slow.json")
    (tmp_path / "bad").write_text('{"slow_layers": 3}')
    with pytest.raises(MpdeployError, match="list of layer names"):
        read_slow_layers(tmp_path / "bad")


def test_densify_records_totals():
    records = [{"name": "a", "pattern": "2:4", "runs_sparse": True, "macs": 100, "macs_kept": 50, "macs_executed": 50},
               {"name": "b", "pattern": "2:4", "runs_sparse": True, "macs": 300, "macs_kept": 150, "macs_executed": 150},
               {"name": "h", "pattern": None, "runs_sparse": False, "macs": 100, "macs_kept": 100, "macs_executed": 100}]
    totals = {"dense_macs": 500, "macs_kept": 300, "macs_executed": 300, "pruned_layers": 2, "sparse_layers": 2,
              "skipped_layers": 1, "mac_reduction": 0.4, "sparse_execution_mac_reduction": 0.4}
    new_records, new = densify_records(records, totals, {"b": "slow"})
    assert new["macs_kept"] == new["macs_executed"] == 450 and new["pruned_layers"] == 1 and new["skipped_layers"] == 2
    assert new["sparse_execution_mac_reduction"] == pytest.approx(0.1)
    assert records[1]["pattern"] == "2:4" and new_records[1]["pattern"] is None  # the input is not modified
    with pytest.raises(MpdeployError, match="not a pruned layer"):
        densify_records(records, totals, {"h": "x"})


def test_cli_torch_plan_end_to_end(chain, tmp_path, capsys):
    """CPU: `densify pruned/ --backend torch` gives back what torch's plan runs dense; `prune --backend torch`
    prunes exactly what densify left sparse."""
    out = tmp_path / "densified"
    assert cli_main(["-q", "densify", str(chain["pruned"]), "--backend", "torch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pruned = {r["name"] for r in open_weights(chain["pruned"]).layers if r["pattern"]}
    left = {r["name"] for r in open_weights(out).layers if r["pattern"]}
    # resnet10t: only the 256 -> 512 1x1 downsample conv is a large 1x1 conv; every k x k conv runs dense in torch.
    assert left == {"layer4.0.downsample.1"}
    _check_densified(out, chain["pruned"], pruned - left)
    assert "linear/mm/addmm only" in printed and f"{len(pruned - left)} layers given their dense weights back" in printed
    assert set(artifacts.read_manifest(out, "pruned")["sources"]) == {"weights"}

    target = tmp_path / "for-torch"
    assert cli_main(["-q", "prune", *MODEL, "--budget", "uniform", "--backend", "torch", "--out", str(target)]) == 0
    manifest = artifacts.read_manifest(target, "pruned")
    assert {r["name"] for r in manifest["layers"] if r["pattern"]} == left
    assert manifest["pruned_for"]["backend"] == "torch" and set(manifest["pruned_for"]["runs_dense"]) == pruned - left
    # Nothing left to give back: said in one line, nothing written.
    again = tmp_path / "again"
    assert cli_main(["-q", "densify", str(target), "--backend", "torch", "--out", str(again)]) == 0
    assert "nothing to give back" in capsys.readouterr().out and not again.exists()


def test_cli_refusals(chain, tmp_path, capsys):
    # An ort engine has no per-layer report (and no sparse kernels on CPU): one line, exit 2, nothing written.
    assert cli_main(["-q", "densify", str(chain["engine"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no sparse kernels" in err and "--trt-log" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["-q", "densify", str(chain["onnx"]), "--out", str(tmp_path / "x")]) == 2
    assert "needs --trt-log" in capsys.readouterr().err
    assert cli_main(["-q", "densify", str(chain["pruned"]), "--out", str(tmp_path / "x")]) == 2
    assert "--backend torch" in capsys.readouterr().err
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "mine.txt").write_text("keep")
    assert cli_main(["-q", "densify", str(chain["pruned"]), "--backend", "torch", "--out", str(tmp_path / "user")]) == 2
    assert (tmp_path / "user" / "mine.txt").read_text() == "keep" and not (tmp_path / "x").exists()


def test_prune_for_ort_says_so_and_follows_trt_rules(chain):
    manifest = artifacts.read_manifest(chain["pruned"], "pruned")
    assert "pruned_for" not in manifest  # no --backend: every layer the pattern fits
    from mpdeploy.backends.ort import PRUNE_NOTE
    from mpdeploy.backends.sparse_plan import sparse_plan
    from mpdeploy.sparsity.pruned import load_pruned

    model = load_pruned(chain["pruned"], "dense").model
    names = [r["name"] for r in manifest["layers"] if r["pattern"]]
    plan = sparse_plan(model, (1, 32, 32), names, "ort")
    assert plan.rules.startswith("TensorRT placement rules") and plan.note == f"ort: {PRUNE_NOTE}"
    assert plan.backend == "ort"
    assert plan.runs_dense == {}  # every Conv weight reaches its Conv directly: eligible for TensorRT
    with pytest.raises(MpdeployError, match="2:4-compatible"):
        from mpdeploy.prune.stage import PruneConfig

        PruneConfig(pattern="8:16", backend="trt")


# ---------------------------------------------------------------------------------------------------
# the speed gate (pure: latency records as the audit's timing writes them)


def _latency(ratio: float, low: float, high: float) -> dict[int, dict]:
    return {1: {"ratio_p50": 1.0, "ratio_interval": {"low": 0.9, "high": 1.1, "confidence": 0.95}},
            32: {"ratio_p50": ratio, "ratio_interval": {"low": low, "high": high, "confidence": 0.95}}}


@pytest.mark.parametrize("backend,runtime", [("trt", {"gpu": "H200"}), ("torch", {"gpu": "H200"}),
                                             ("ort", {"providers_preferred": ["TensorrtExecutionProvider"]})])
def test_speed_gate_where_sparse_kernels_exist(backend, runtime):
    findings = Findings()
    gate = speed_gate(AuditConfig(), _latency(0.9, 0.85, 0.95), findings, backend, runtime)
    assert gate["verdict"] == "slower" and gate["batch"] == 32 and gate["sparse_kernels"]
    assert len(findings.failures) == 1 and "measurably slower" in findings.failures[0]
    assert "ship the dense engine" in findings.failures[0]

    findings = Findings()
    gate = speed_gate(AuditConfig(), _latency(1.01, 0.97, 1.05), findings, backend, runtime)
    assert gate["verdict"] == "no measurable speedup" and not findings.failures
    assert any("ship the dense engine" in w for w in findings.warnings)

    findings = Findings()
    assert speed_gate(AuditConfig(), _latency(1.2, 1.1, 1.3), findings, backend, runtime)["verdict"] == "faster"
    assert not findings.failures and not findings.warnings
    # --min-speedup is stricter still.
    findings = Findings()
    speed_gate(AuditConfig(min_speedup=1.5), _latency(1.2, 1.1, 1.3), findings, backend, runtime)
    assert len(findings.failures) == 1 and "< required 1.5x" in findings.failures[0]
    # fail_if_slower=False turns the default failure into a warning.
    findings = Findings()
    speed_gate(AuditConfig(fail_if_slower=False), _latency(0.9, 0.85, 0.95), findings, backend, runtime)
    assert not findings.failures and any("measurably slower" in w for w in findings.warnings)


def test_speed_gate_on_ort_cpu_makes_no_speed_claim():
    runtime = {"providers_preferred": ["CPUExecutionProvider"], "cpu": "x86"}
    findings = Findings()
    gate = speed_gate(AuditConfig(), _latency(0.8, 0.7, 0.9), findings, "ort", runtime)
    assert gate["sparse_kernels"] is False and gate["verdict"].startswith("no speed claim")
    assert not findings.failures and not findings.warnings
    findings = Findings()
    speed_gate(AuditConfig(min_speedup=1.1), _latency(0.8, 0.7, 0.9), findings, "ort", runtime)
    assert len(findings.failures) == 1  # an explicit --min-speedup still gates
    # ONNX Runtime's CUDA provider has no sparse kernels either: no claim, and a line saying why.
    findings = Findings()
    gate = speed_gate(AuditConfig(), _latency(0.8, 0.7, 0.9), findings, "ort",
                      {"providers_preferred": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert gate["verdict"].startswith("no speed claim") and not findings.failures
    assert len(findings.warnings) == 1 and "no 2:4 sparse kernels" in findings.warnings[0]
