"""A CORnet-Z-style network, written from its published description (Kubilius et al. 2018, "CORnet:
Modeling the Neural Mechanisms of Core Object Recognition"): four feedforward areas named after the
ventral stream, V1, V2, V4 and IT, each one convolution, a ReLU and a max pool, then a decoder
(global average pool and a linear read-out). V1's convolution is 7x7 with stride 2, the others 3x3;
channels double from area to area (64, 128, 256, 512).

No weights ship with it: the model files use random initialisation (seeded), or give a state dict
of your own as ``checkpoint``. ``width`` scales the channels (0.25: 16, 32, 64, 128) for small demos.
"""

from __future__ import annotations

from torch import nn


class Area(nn.Module):
    """One area: convolution, ReLU, 3x3 max pool with stride 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.nonlin = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(self.nonlin(self.conv(x)))


class Decoder(nn.Module):
    """Global average pool, flatten, linear read-out."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.linear(self.flatten(self.avgpool(x)))


class CORnetZ(nn.Module):
    """V1 -> V2 -> V4 -> IT -> decoder."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width={width!r}: expected a positive channel scale (1: 64, 128, 256, 512 channels)")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"num_classes={num_classes!r}: expected a positive integer")
        c = [max(1, round(n * width)) for n in (64, 128, 256, 512)]
        self.V1 = Area(3, c[0], kernel_size=7, stride=2)
        self.V2 = Area(c[0], c[1])
        self.V4 = Area(c[1], c[2])
        self.IT = Area(c[2], c[3])
        self.decoder = Decoder(c[3], num_classes)

    def forward(self, x):
        return self.decoder(self.IT(self.V4(self.V2(self.V1(x)))))


def cornet_z(num_classes: int = 1000, width: float = 1.0) -> CORnetZ:
    """The factory the model files name (``unitmatch.examples.cornet_z:cornet_z``)."""
    return CORnetZ(num_classes=num_classes, width=width)
