"""Architectures that are not in timm, as a user would train them elsewhere (for test_own_model.py).

Module-level classes so full pickles of them load, and `--arch own_archs:SmallCNN` imports them.
Widths are multiples of 16 so every inner layer takes 2:4 .. 8:16.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv stem + BatchNorm + a residual block + 1x1 conv + global pool + Linear head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.stem(x)))
        y = torch.relu(y + self.bn2(self.conv(y)))  # residual add
        y = torch.relu(self.expand(y))
        return self.fc(y.mean(dim=(2, 3)))


class SmallViT(nn.Module):
    """Patch embedding + one pre-norm transformer block (attention + MLP, LayerNorm) + Linear head."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, dim: int = 32, patch: int = 4,
                 img_size: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, D]
        b, n, d = t.shape
        qkv = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(t))))
        return self.head(self.norm(t).mean(dim=1))
