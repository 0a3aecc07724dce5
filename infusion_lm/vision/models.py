"""Image classifiers in plain torch, behind one wrapper the HF Trainer, kronfluence and the editors all call.

- ``resnet_tiny``: the paper's tiny ResNet (widths 32 → 64 → 128, one basic block per stage, global average pool).
- ``cnn``: the paper's simple CNN (two conv + max-pool stages, two linear layers).
- ``torchvision:<name>``: any torchvision classification model, e.g. ``torchvision:resnet18`` (needs torchvision).

Normalisation lives *inside* the model (a buffer-backed ``Normalize``), so pixels stay in [0, 1] everywhere else:
the L∞ budget and the clamp of the pixel editors are in that space, as in the paper's threat model.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

ARCHITECTURES = ("resnet_tiny", "cnn")


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        blocks, cin = [], w0
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SimpleCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 4)  # any input size (8×8 digits, 28×28 Fashion-MNIST, 32×32 CIFAR)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ImageClassifier(nn.Module):
    """pixels in [0, 1] → normalise → backbone → logits. ``forward(pixel_values, labels=None)`` returns an HF
    ``ImageClassifierOutput`` (mean cross-entropy as ``loss`` when labels are given), which is what the Trainer wants."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float], architecture: str):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.architecture = architecture

    def forward(self, pixel_values, labels: Optional[torch.Tensor] = None, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        # pixels arrive as fp32 from the collator; a bf16/fp16 model (run.dtype) takes them in its own dtype
        logits = self.backbone(self.normalize(pixel_values.to(self.normalize.mean.dtype)))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_image_model(architecture: str, num_classes: int, in_channels: int, mean: Sequence[float],
                      std: Sequence[float], seed: int = 0) -> ImageClassifier:
    """A freshly initialised classifier; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "resnet_tiny":
            backbone = TinyResNet(in_channels, num_classes)
        elif architecture == "cnn":
            backbone = SimpleCNN(in_channels, num_classes)
        elif architecture.startswith("torchvision:"):
            backbone = _torchvision_model(architecture.split(":", 1)[1], num_classes, in_channels)
        else:
            raise ConfigError(f"Unknown image model {architecture!r}; use one of {list(ARCHITECTURES)} or "
                              f"`torchvision:<name>` (e.g. torchvision:resnet18).")
    return ImageClassifier(backbone, mean, std, architecture)


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ConfigError(f"model torchvision:{name} needs torchvision; `pip install torchvision`.") from None
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no classification model {name!r}; see "
                          f"torchvision.models.list_models().") from None
    if in_channels != 3:  # grey-scale data: repeat the channel rather than rebuild the stem of every architecture
        return nn.Sequential(_RepeatChannels(3), model)
    return model


class _RepeatChannels(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.expand(-1, self.n, -1, -1) if x.shape[1] == 1 else x


def tracked_image_modules(model: nn.Module, patterns: Sequence[str] = ()) -> list:
    """Conv2d and Linear modules to track (all of them unless glob ``patterns`` narrow the choice)."""
    import fnmatch

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not names:
            raise ConfigError(f"influence.tracked_modules {list(patterns)} matches no Conv2d/Linear module; "
                              f"modules are named like {[n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:4]}.")
    return names
