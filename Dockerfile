# mpdeploy with TensorRT: build sparse engines on a GPU host.
#   docker build -t mpdeploy .
#   docker run --gpus all --rm -v "$PWD/engines:/work/engines" -v "$PWD/models:/models" \
#       mpdeploy build /models/model.pt --arch resnet50 --sparse --backend trt
# NVIDIA's TensorRT container brings CUDA, cuDNN, TensorRT and its Python bindings; pin the tag to the
# TensorRT version your Triton server runs (a plan only loads on the TensorRT version that built it).
# TensorRT generation: the default base is a 25.xx container, which ships TensorRT 10. The trt backend is
# written for TensorRT 10 and 11 (strongly typed builds from model.fp16/bf16/int8.onnx on both; the
# legacy FP16/INT8 builder flags and calibrator only where TensorRT 10 still has them). For TensorRT 11,
# pass a base image that carries it: docker build --build-arg BASE_IMAGE=<a TensorRT 11 image> .
# `pip install .[trt]` requires tensorrt>=10,<12 and refuses anything else.
# Not built or run on this project's machines (no Docker engine, no GPU): see README, "Verified where".
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.01-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/mpdeploy
COPY pyproject.toml README.md ./
COPY mpdeploy ./mpdeploy
# tensorrt is already in the image; [trt] adds polygraphy, [serve] the Triton client.
RUN python3 -m pip install --no-cache-dir ".[trt,serve]"

WORKDIR /work
ENTRYPOINT ["mpdeploy"]
CMD ["--help"]
