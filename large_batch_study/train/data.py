"""Real data read once into in-memory tensors, batched by index slicing (no per-sample Python loop).

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, which installs the four gzipped
IDX files into /usr/share/datasets/fashion-mnist/ (``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
SETUP_HINT = "install it with: apt-get update && apt-get install -y dataset-fashion-mnist"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if ndim else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(raw) - offset} data bytes, shape {shape} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


@dataclass
class Split:
    x: torch.Tensor  # float32 [N, 1, 28, 28], normalized
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    info: dict


def load_fashion_mnist(root: Optional[str] = None, val_size: int = 5000, train_subset: int = 0,
                       test_subset: int = 0, split_seed: int = 0) -> Data:
    """Train / validation / test splits of Fashion-MNIST as normalized in-memory tensors.

    The validation split is ``val_size`` images held out of the 60k training set (a fixed random
    permutation from ``split_seed``); ``train_subset`` > 0 keeps only that many of the rest.
    Normalization uses the mean and std of the training images actually trained on.
    """
    root = root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    paths = {k: os.path.join(root, v) for k, v in FASHION_MNIST_FILES.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({missing[0]}); {SETUP_HINT}")
    xtr = read_idx(paths["train_images"])
    ytr = read_idx(paths["train_labels"])
    xte = read_idx(paths["test_images"])
    yte = read_idx(paths["test_labels"])
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError("image and label counts differ")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(xtr.shape[0], generator=g)
    val_idx, tr_idx = perm[:val_size], perm[val_size:]
    if train_subset:
        tr_idx = tr_idx[:train_subset]
    xtr_t = torch.from_numpy(np.array(xtr)).float().div_(255.0).unsqueeze(1)
    xte_t = torch.from_numpy(np.array(xte)).float().div_(255.0).unsqueeze(1)
    ytr_t = torch.from_numpy(np.array(ytr)).long()
    yte_t = torch.from_numpy(np.array(yte)).long()
    if test_subset:
        xte_t, yte_t = xte_t[:test_subset], yte_t[:test_subset]
    mean = xtr_t[tr_idx].mean().item()
    std = xtr_t[tr_idx].std().item()

    def norm(x):
        return ((x - mean) / std).contiguous()

    info = dict(dataset="fashion-mnist", root=root, n_train=int(tr_idx.numel()),
                n_val=int(val_idx.numel()), n_test=int(yte_t.numel()), split_seed=split_seed,
                mean=mean, std=std, classes=10)
    return Data(Split(norm(xtr_t[tr_idx]), ytr_t[tr_idx]), Split(norm(xtr_t[val_idx]), ytr_t[val_idx]),
                Split(norm(xte_t), yte_t), info)


def batches(split: Split, batch_size: int, generator: Optional[torch.Generator] = None,
            shuffle: bool = True, drop_last: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches by slicing a permutation of the in-memory tensors."""
    n = len(split)
    if shuffle:
        idx = torch.randperm(n, generator=generator).to(split.x.device)
    else:
        idx = None
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        if idx is None:
            yield split.x[start : start + batch_size], split.y[start : start + batch_size]
        else:
            j = idx[start : start + batch_size]
            yield split.x.index_select(0, j), split.y.index_select(0, j)
