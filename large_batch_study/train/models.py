"""The models, in plain torch.nn (torchvision does not import beside torch 2.13 CPU).

- ``cnn``: two convolutional layers and two fully connected ones, the kind of network of the
  paper's Figure 1 (a network with two convolutional layers), sized for 28x28 grey images.
- ``resnet`` / ``resnetN``: a CIFAR-style ResNet (He et al.'s 6n+2 family, like the paper's
  ResNet-20) with three stages of n basic blocks each; ``resnet`` is ResNet-8 (n=1).
- ``lstm`` / ``lstmN``: a character-level language model of the paper's Section 7.2 shape (2-layer
  LSTM, embedding size = hidden size, dropout 0.2); ``lstm`` has width 128 (the paper's 200 is
  ``lstm200``, ~2x the CPU time).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """LeNet-5 shape: conv5x5(6) - pool - conv5x5(16) - pool - fc120 - fc84 - fc10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 6,
                 image_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5)
        self.conv2 = nn.Conv2d(width, 16 * width // 6, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(self.conv2.out_channels * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, depth: int = 8, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 stem_stride: int = 1):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("ResNet depth must be 6n+2 (8, 14, 20, ...)")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, w, stride))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class CharLSTM(nn.Module):
    """Embedding - dropout - 2-layer LSTM (dropout between layers) - dropout - linear decoder, with
    the initialization of PyTorch's word_language_model example, whose defaults the paper's LSTM
    setting matches (200/200, 2 layers, dropout 0.2, 40 epochs, batch 20)."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab_size, width)
        self.rnn = nn.LSTM(width, width, layers, dropout=dropout)
        self.decoder = nn.Linear(width, vocab_size)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden=None):
        """x: [T, B] character ids -> logits [T, B, vocab] and the LSTM state to carry on."""
        out, hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return self.decoder(self.drop(out)), hidden


MODELS = {
    "cnn": "LeNet-5 shape: conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc10",
    "resnet": "ResNet-8: 3x3 conv(16) + 3 stages x 1 basic block (16/32/64, BatchNorm), avg-pool, fc",
    "resnetN": "ResNet-N, N = 6n+2 (resnet20: the paper's ResNet-20 with 3 blocks per stage)",
    "lstm": "character LM: embedding 128 - 2-layer LSTM 128 (dropout 0.2) - linear decoder",
    "lstmN": "the same with embedding and hidden size N (lstm200: the paper's Section 7.2 size)",
}


def build_model(name: str, **kw) -> nn.Module:
    if name == "cnn":
        return SmallCNN(**kw)
    if name.startswith("resnet"):
        depth = int(name[len("resnet"):] or 8)
        return ResNet(depth=depth, **kw)
    if name.startswith("lstm"):
        return CharLSTM(width=int(name[len("lstm"):] or 128), **kw)
    raise ValueError(f"unknown model {name!r} (cnn, resnet, resnet8, resnet14, resnet20, ..., lstm, lstm200, ...)")
