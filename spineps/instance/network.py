"""The instance-phase 3D residual U-Net, with the parameter layout of the released SPINEPS
instance checkpoint (``shared/spec/instance-unet3d.md``): the same module names and shapes,
so that the official ``state_dict`` (prefix ``network.`` stripped) loads unchanged.

Input: a one-hot semantic cutout ``(batch, in_channels, P, I, R)``, each spatial size
divisible by 8. Output: 4 logits per voxel (0 background, 1 vertebra above the cutout
centre, 2 the centre vertebra, 3 the vertebra below).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["InstanceUNet3D", "ResnetBlock", "ConvBlock", "N_CLASSES", "count_parameters"]

#: background + above / centre / below
N_CLASSES = 4
_WIDTH_MULTS = (1, 2, 4, 8)


class ConvBlock(nn.Module):
    """Conv3d(k3, p1, bias) -> GroupNorm(8) -> LeakyReLU(0.01)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=True)
        self.norm = nn.GroupNorm(groups, c_out)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class ResnetBlock(nn.Module):
    """block2(block1(x)) + shortcut(x); the shortcut is a 1x1x1 conv only when the width
    changes. No activation after the sum."""

    def __init__(self, c_in: int, c_out: int, groups: int = 8):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, groups)
        self.block2 = ConvBlock(c_out, c_out, groups)
        self.res_conv: nn.Module = nn.Conv3d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x)) + self.res_conv(x)


class InstanceUNet3D(nn.Module):
    """``InstanceUNet3D(in_channels=10, dim=16)`` is the released MRI instance model
    (5,375,124 parameters); ``dim=8, in_channels=11`` the narrower variant (1,361,924)."""

    def __init__(self, in_channels: int = 10, dim: int = 16, out_channels: int = N_CLASSES,
                 mults: Sequence[int] = _WIDTH_MULTS):
        super().__init__()
        if dim % 8:
            raise ValueError(f"dim must be a multiple of 8 (GroupNorm with 8 groups), got {dim}")
        self.in_channels = int(in_channels)
        self.dim = int(dim)
        self.out_channels = int(out_channels)
        widths = [dim * m for m in mults]
        n = len(widths)
        self.init_conv = nn.Conv3d(in_channels, dim, kernel_size=7, padding=3, bias=True)

        self.downs = nn.ModuleList()
        prev = dim
        for i, w in enumerate(widths):
            last = i == n - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(prev, w),
                ResnetBlock(w, w),
                nn.Identity() if last else nn.Conv3d(w, w, kernel_size=4, stride=2, padding=1),
            ]))
            prev = w

        mid = widths[-1]
        # the decoder walks back up: widths[-1] -> widths[-2] -> ... -> widths[0] -> widths[0]
        self.ups = nn.ModuleList()
        rev = list(reversed(widths))
        for j in range(n):
            w_in = rev[j]
            w_out = rev[j + 1] if j + 1 < n else widths[0]
            last = j == n - 1
            self.ups.append(nn.ModuleList([
                ResnetBlock(w_in, w_out),
                ResnetBlock(w_out, w_out),
                nn.Identity() if last else nn.ConvTranspose3d(w_out, w_out, kernel_size=4, stride=2, padding=1),
            ]))

        self.mid_block1 = ResnetBlock(mid, mid)
        self.mid_block2 = ResnetBlock(mid, mid)
        self.final_res_block = ResnetBlock(2 * dim, dim)
        self.final_conv = nn.Conv3d(dim, out_channels, kernel_size=1, bias=True)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.downs) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.divisor
        if any(int(s) % d for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be divisible by {d}, got {tuple(x.shape[2:])}")
        x = self.init_conv(x)
        r = x
        skips = []
        for stage in self.downs:
            block_a, block_b, down = stage.children()
            x = block_b(block_a(x))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_block1(x))
        for stage in self.ups:
            block_a, block_b, up = stage.children()
            x = 0.5 * (x + skips.pop())
            x = block_b(block_a(x))
            x = up(x)
        x = torch.cat((x, r), dim=1)
        return self.final_conv(self.final_res_block(x))


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
