# mpdeploy with TensorRT: build sparse engines on a GPU host.
#   docker build -t mpdeploy .
#   docker run --gpus all --rm -v "$PWD/engines:/work/engines" -v "$PWD/models:/models" \
#       mpdeploy build /models/model.pt --arch resnet50 --sparse --backend trt
# NVIDIA's TensorRT container brings CUDA, cuDNN, TensorRT and its Python bindings; pin the tag to the
# TensorRT version your Triton server runs (a plan only loads on the TensorRT version that built it).
# Not built or run on this project's machines (no Docker engine, no GPU): see README, "Verified where".
FROM nvcr.io/nvidia/tensorrt:25.01-py3

WORKDIR /opt/mpdeploy
COPY pyproject.toml README.md ./
COPY mpdeploy ./mpdeploy
# tensorrt is already in the image; [trt] adds polygraphy, [serve] the Triton client.
RUN python3 -m pip install --no-cache-dir ".[trt,serve]"

WORKDIR /work
ENTRYPOINT ["mpdeploy"]
CMD ["--help"]
