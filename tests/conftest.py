import os

import torch

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside ONNX Runtime.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI; random-init timm models only
