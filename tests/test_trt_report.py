"""The TensorRT log / engine-inspector parsers and the pitfall detector, on text in TensorRT's formats.

The samples are written here (own layer names) in the formats found in public sources; each test says
where its format comes from. No TensorRT is needed.
"""

from __future__ import annotations

import json

from mpdeploy.backends.trt.report import (
    layer_not_sparse_reasons,
    parse_engine_inspector,
    parse_sparsity_log,
    pitfall_warnings,
)

# Format: TensorRT Developer Guide, "Structured Sparsity" (trtexec --verbose output, TensorRT 8.x+):
#   [03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
#   [03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
TRTEXEC_LOG = """\
[05/02/2024-10:11:12] [I] [TRT] Detected 1 inputs and 1 output network tensors.
[05/02/2024-10:11:12] [I] [TRT] (Sparsity) Layers eligible for sparse math: stem.conv, block1.conv, block2.conv
[05/02/2024-10:11:12] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: block2.conv
[05/02/2024-10:11:12] [I] [TRT] Total Host Persistent Memory: 160
"""


def test_developer_guide_format():
    parsed = parse_sparsity_log(TRTEXEC_LOG)
    assert parsed == {"eligible": ["stem.conv", "block1.conv", "block2.conv"], "picked_sparse": ["block2.conv"]}


def test_fused_layer_names_keep_their_plus():
    # Format: NVIDIA/TensorRT issue #4054 (trtexec --sparsity=enable --fp16 --verbose, TensorRT 8.x): fused
    # layers are listed as "Conv_619 + Relu_620", separated by ", ".
    log = ("[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_7, "
           "Conv_1 + Relu_2, Conv_3 + Add_4 + Relu_5\n"
           "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "
           "Conv_3 + Add_4 + Relu_5\n")
    parsed = parse_sparsity_log(log)
    assert parsed["eligible"] == ["MatMul_7", "Conv_1 + Relu_2", "Conv_3 + Add_4 + Relu_5"]
    assert parsed["picked_sparse"] == ["Conv_3 + Add_4 + Relu_5"]


def test_empty_picked_list_and_terminal_wrapped_lines():
    # Format: NVIDIA/TensorRT issue #2169: a pasted log whose long eligible line is wrapped mid-name by the
    # terminal ("Mat" / "Mul_51"), followed by a picked line with no layers at all.
    log = ("[07/19/2022-11:58:20] [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51, Mat\n"
           "Mul_69, Gemm_725\n"
           "[07/19/2022-11:58:20] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers:\n"
           "[07/19/2022-11:58:20] [I] [TRT] Engine built in 12.3 seconds.\n")
    parsed = parse_sparsity_log(log)
    assert parsed["eligible"] == ["Conv_22", "MatMul_51", "MatMul_69", "Gemm_725"]
    assert parsed["picked_sparse"] == []


def test_polygraphy_captured_format_and_myelin_regions():
    # Format: what mpdeploy's capture writes: Polygraphy's G_LOGGER prefixes each TensorRT message with its
    # severity letter ("[V] ", polygraphy/logger/logger.py SEVERITY_LETTER_MAPPING). TensorRT 10 names layers
    # after the ONNX nodes and lists Myelin regions as {ForeignNode[first...last]} (commas inside stay).
    log = ("[V] Building engine\n"
           "[V] (Sparsity) Layers eligible for sparse math: /conv1/Conv + /relu/Relu, "
           "{ForeignNode[/blocks.0/norm1/LayerNormalization.../head/Gemm, x]}\n"
           "[V] (Sparsity) TRT inference plan picked sparse implementation for layers: /conv1/Conv + /relu/Relu\n")
    parsed = parse_sparsity_log(log)
    assert parsed["eligible"] == ["/conv1/Conv + /relu/Relu",
                                  "{ForeignNode[/blocks.0/norm1/LayerNormalization.../head/Gemm, x]}"]
    assert parsed["picked_sparse"] == ["/conv1/Conv + /relu/Relu"]


def test_absent_lines_are_none():
    assert parse_sparsity_log("[I] [TRT] nothing about sparsity\n") == {"eligible": None, "picked_sparse": None}


# Format: TensorRT Developer Guide, "Engine Inspector" (kDETAILED layer information, TensorRT 8.x, which
# calls the sparsity flag "AllowSparse"); the top level {"Layers": [...], "Bindings": [...]} is what
# get_engine_information returns (read the same way by TensorRT's trt-engine-explorer, trex/parser.py).
GUIDE_LAYER = {
    "Name": "stage3/conv_a + stage3/bn_a + stage3/relu_a",
    "LayerType": "CaskConvolution",
    "Inputs": [{"Name": "x", "Dimensions": [16, 512, 28, 28],
                "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
    "Outputs": [{"Name": "y", "Dimensions": [16, 256, 28, 28],
                 "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}],
    "ParameterType": "Convolution",
    "Kernel": [1, 1],
    "Weights": {"Type": "Int8", "Count": 131072},
    "Bias": {"Type": "Float", "Count": 256},
    "AllowSparse": 0,
    "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_tilesize256x128x64",
    "TacticValue": "0x11bde0e1d9f2f35d",
}

# Format: a public engine dump with "HasSparseWeights" (TensorRT 8.5+/10 name of the flag), dynamic-shape
# "Format/Datatype": "N/A due to dynamic shapes", a NoOp layer without tactic name, and Bindings.
DYNAMIC_ENGINE = {
    "Layers": [
        {"Name": "(Unnamed Layer* 0) [Shuffle]", "LayerType": "NoOp",
         "Inputs": [{"Name": "in", "Location": "Device", "Dimensions": [-1, 4096],
                     "Format/Datatype": "N/A due to dynamic shapes"}],
         "Outputs": [{"Name": "s", "Location": "Device", "Dimensions": [-1, 256, 4, 4],
                      "Format/Datatype": "N/A due to dynamic shapes"}],
         "TacticValue": "0x0000000000000000"},
        {"Name": "/fc1/MatMul", "LayerType": "CaskGemmMatrixMultiply", "ParameterType": "MatrixMultiply",
         "Outputs": [{"Name": "o", "Dimensions": [-1, 512], "Format/Datatype": "Row major linear FP16 format"}],
         "Weights": {"Type": "Half", "Count": 131072},
         "HasSparseWeights": 1,
         "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize128x128x32_stage4_warpsize2x2x1_sptensor16x8x32",
         "TacticValue": "0x1234",
         # TensorRT 8.6+ Metadata: ONNX node names, joined by \x1e (trex/parser.py fix_metadata).
         "Metadata": "[ONNX Layer: /fc1/MatMul]\x1e[ONNX Layer: /fc1/Add]"},
        {"Name": "/fc2/MatMul [profile 1]", "LayerType": "CaskGemmMatrixMultiply",
         "Outputs": [{"Name": "o2", "Dimensions": [-1, 10], "Datatype": "Half", "Format": "Row major linear"}],
         "HasSparseWeights": 1, "TacticName": "sm80_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize64x64x32",
         "TacticValue": "0x5678"},
    ],
    "Bindings": ["in", "o2"],
}


def test_inspector_guide_layer_allow_sparse():
    (layer,) = parse_engine_inspector({"Layers": [GUIDE_LAYER]})
    assert layer["name"] == GUIDE_LAYER["Name"]
    assert layer["type"] == "CaskConvolution" and layer["parameter_type"] == "Convolution"
    assert layer["has_sparse_weights"] is False
    assert layer["sparse_tactic"] is False
    assert layer["precision"] == "INT8"
    assert layer["weights"] == {"Type": "Int8", "Count": 131072}


def test_inspector_has_sparse_weights_metadata_profiles_and_text_input():
    layers = parse_engine_inspector(json.dumps(DYNAMIC_ENGINE))
    noop, fc1, fc2 = layers
    assert noop["tactic"] is None and noop["has_sparse_weights"] is None and noop["precision"] is None
    assert fc1["has_sparse_weights"] is True and fc1["sparse_tactic"] is True
    assert fc1["onnx_nodes"] == ["/fc1/MatMul", "/fc1/Add"]
    assert fc1["precision"] == "FP16"
    # TensorRT 11 splits Format/Datatype into Datatype + Format (as Polygraphy's inspect tool reads it).
    assert fc2["precision"] == "FP16" and fc2["profile"] == 1
    assert fc2["has_sparse_weights"] is True and fc2["sparse_tactic"] is False


def test_inspector_layer_names_only():
    # ProfilingVerbosity.LAYER_NAMES_ONLY: the developer guide shows each layer as a bare name string.
    layers = parse_engine_inspector('{"Layers": ["conv_a + bn_a + relu_a", "fc"], "Bindings": ["x", "y"]}')
    assert [x["name"] for x in layers] == ["conv_a + bn_a + relu_a", "fc"]
    assert all(x["tactic"] is None and x["has_sparse_weights"] is None for x in layers)


def _tensor(layer, consumer, eligible=True, is_24=True, reason=None, path=()):
    return {"initializer": f"{layer}.weight", "layer": layer, "consumer": consumer, "runs_sparse": True,
            "eligible": eligible, "is_2_4": is_24, "reason": reason, "path": list(path)}


def test_pitfalls_eligible_not_picked_and_reasons():
    report = {"eligible": ["/a/Conv", "/b/Conv + /b/Relu"], "picked_sparse": ["/a/Conv"], "precision": "fp16",
              "sparse_weights": True, "batch_sizes": [8, 32],
              "layers": [{"name": "/b/Conv + /b/Relu", "tactic": "sm80_dense_conv", "has_sparse_weights": True,
                          "sparse_tactic": False}]}
    sparsity = {"tensors": [_tensor("a", "/a/Conv"), _tensor("b", "/b/Conv")]}
    warnings = pitfall_warnings(report, sparsity)
    assert any(w.startswith("eligible but not picked: 1 of 2") and "/b/Conv + /b/Relu" in w for w in warnings)
    assert not any("tiny batch" in w for w in warnings)
    assert not any("not in TensorRT's eligible list" in w for w in warnings)
    (reason,) = layer_not_sparse_reasons(report)
    assert reason["layer"] == "/b/Conv + /b/Relu" and "sm80_dense_conv" in reason["reason"]


def test_pitfalls_annotated_but_not_eligible():
    # ONNX-side: a weight reaching its MatMul through Reshape (export's sparsity.json reason);
    # TensorRT-side: an ONNX-eligible tensor whose consumer TensorRT did not list.
    sparsity = {"tensors": [
        _tensor("blocks.0.attn.qkv", "/blocks.0/attn/qkv/MatMul", eligible=False,
                reason="reaches MatMul through Reshape (path Reshape): TensorRT's sparsity check does not look through Reshape"),
        _tensor("head", "/head/Gemm"),
    ]}
    report = {"eligible": ["/stem/Conv"], "picked_sparse": [], "precision": "fp16", "sparse_weights": True,
              "batch_sizes": [1, 8]}
    warnings = pitfall_warnings(report, sparsity)
    text = "\n".join(warnings)
    assert "annotated 2:4 but not eligible in the ONNX" in text and "through Reshape" in text
    assert "not in TensorRT's eligible list: head (/head/Gemm)" in text
    assert "picked no sparse implementation" in text
    assert "tiny batch sizes (1, 8)" in text


def test_pitfalls_int8_qdq_dense_kernels_fp32_and_missing_log():
    report = {"eligible": None, "picked_sparse": None, "precision": "int8", "sparse_weights": True,
              "batch_sizes": [32],
              "layers": [{"name": "/c/Conv", "tactic": "sm80_xmma_fprop_implicit_gemm_i8i8", "has_sparse_weights": True,
                          "sparse_tactic": False}]}
    text = "\n".join(pitfall_warnings(report, {"tensors": [_tensor("c", "/c/Conv", path=["DequantizeLinear"])]}))
    assert "INT8: 1 layers report sparse weights" in text
    assert "no '(Sparsity) Layers eligible" in text
    fp32 = pitfall_warnings({"eligible": [], "picked_sparse": [], "precision": "fp32", "sparse_weights": True}, {})
    assert any("precision fp32" in w for w in fp32)


def test_pitfalls_myelin_region_and_dense_twin():
    report = {"eligible": ["{ForeignNode[/blocks.0/x.../head/Gemm]}"], "picked_sparse": [], "precision": "fp16",
              "sparse_weights": True, "batch_sizes": [16]}
    text = "\n".join(pitfall_warnings(report, {"tensors": [_tensor("head", "/head/Gemm")]}))
    assert "Myelin-fused regions" in text and "not in TensorRT's eligible list" not in text
    # The dense twin is built without SPARSE_WEIGHTS: nothing to warn about.
    assert pitfall_warnings({**report, "sparse_weights": False}, {}) == []


def test_engine_io_bindings_and_tensorrt11_io_tensors():
    # TensorRT 10's inspector lists names under "Bindings"; TensorRT 11 renamed the key to "I/O Tensors"
    # (NVIDIA's 10.x -> 11.x migration notes). No public TensorRT 11 sample was found, so entries are
    # accepted as names or as objects (Name / Mode / Datatype / Dimensions, the per-tensor keys the
    # inspector uses for layer inputs and outputs).
    from mpdeploy.backends.trt.report import parse_engine_io

    assert parse_engine_io({"Layers": [], "Bindings": ["input", "logits"]}) == {
        "key": "Bindings", "tensors": [{"name": "input", "mode": None, "dtype": None, "shape": None},
                                       {"name": "logits", "mode": None, "dtype": None, "shape": None}]}
    trt11 = json.dumps({"Layers": ["a"], "I/O Tensors": [
        {"Name": "input", "Mode": "Input", "Datatype": "Float", "Dimensions": [-1, 3, 224, 224]},
        {"Name": "logits", "Mode": "Output", "Datatype": "Float", "Dimensions": [-1, 1000]}]})
    io = parse_engine_io(trt11)
    assert io["key"] == "I/O Tensors" and [t["name"] for t in io["tensors"]] == ["input", "logits"]
    assert io["tensors"][0]["shape"] == [-1, 3, 224, 224] and io["tensors"][1]["mode"] == "Output"
    assert parse_engine_inspector(trt11)[0]["name"] == "a"  # the layer list is read either way
    assert parse_engine_io({"Layers": []}) == {"key": None, "tensors": []}


def test_neither_sparsity_line_is_named():
    report = {"eligible": None, "picked_sparse": None, "precision": "fp16", "sparse_weights": True, "layers": []}
    text = "\n".join(pitfall_warnings(report, {}))
    assert "neither sparsity line appears" in text and "TensorRT 11" in text
    only_picked = {**report, "picked_sparse": ["conv"]}
    assert "neither" not in "\n".join(pitfall_warnings(only_picked, {}))
