"""torchvision's ResNet-50 written out with ``torch.nn``, for checking and timing
:class:`~magnet_jax.backbones.resnet.ResNet50` against PyTorch where torchvision is not
installed: the same module names (so the same state-dict keys), v1.5 (the stride in the
3x3 convolution). Needs PyTorch; nothing else in the package imports this module."""

from __future__ import annotations

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)


def resnet50(torch):
    """A randomly initialised torchvision-layout ResNet-50 (``torch``: the imported module).

    Its ``features(x)`` gives the pooled ``[B, 2048]`` features, ``forward(x)`` the
    ``[B, 1000]`` logits, for ``x`` ``[B, 3, H, W]``.
    """
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * 4),
                )

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
            inplanes = 64
            for index, (blocks, planes) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS)):
                layer = []
                for block in range(blocks):
                    stride = 2 if index > 0 and block == 0 else 1
                    layer.append(Bottleneck(inplanes, planes, stride))
                    inplanes = planes * 4
                setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, 1000)

        def features(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        def forward(self, x):
            return self.fc(self.features(x))

    return ResNet50()
