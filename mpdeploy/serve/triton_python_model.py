"""Triton Python-backend model that serves the ONNX file beside it with ONNX Runtime on CPU.

`mpdeploy ship --serve-backend python` copies this file verbatim to `<repo>/<model>/<version>/model.py`,
next to `model.onnx`. It depends only on numpy, onnxruntime and Triton's `triton_python_backend_utils`
(provided by the backend at run time), never on mpdeploy. Input and output names come from the model's
config.pbtxt, so the same file serves any model.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        # With max_batch_size > 0 the first dim is the batch: the dynamic batcher's requests are
        # concatenated into one ONNX Runtime call and split again.
        self.batched = int(config.get("max_batch_size", 0)) > 0
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def _run(self, feeds):
        return self.session.run(self.output_names, feeds)

    def _response(self, outputs):
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out)) for name, out in zip(self.output_names, outputs)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(exc):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))

    def execute(self, requests):
        feeds = []
        for request in requests:
            feeds.append({n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.input_names})
        if self.batched and len(feeds) > 1:
            try:
                sizes = [f[self.input_names[0]].shape[0] for f in feeds]
                merged = {n: np.concatenate([f[n] for f in feeds], axis=0) for n in self.input_names}
                outputs = self._run(merged)
                cuts = np.cumsum(sizes)[:-1]
                parts = [np.split(out, cuts, axis=0) for out in outputs]
                return [self._response([p[i] for p in parts]) for i in range(len(feeds))]
            except Exception:  # noqa: BLE001 - fall back to one call per request for per-request errors
                pass
        responses = []
        for feed in feeds:
            try:
                responses.append(self._response(self._run(feed)))
            except Exception as exc:  # noqa: BLE001 - report to the client, keep serving
                responses.append(self._error(exc))
        return responses

    def finalize(self):
        self.session = None
