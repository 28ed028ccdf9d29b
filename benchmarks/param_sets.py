"""Parameter sets with the shapes of real models, written out by hand (no torchvision needed).

Each set is a list of tensor shapes plus a dtype: what an optimizer step sees after backward.
Counts are checked against the published figures when the module is run:

    resnet20   ResNet-20 for CIFAR-10 (He et al. 2016, option-A shortcuts)      269,722 params,  59 tensors
    resnet50   torchvision's resnet50 (conv + BN weight/bias + fc)           25,557,032 params, 161 tensors
    gpt2       GPT-2 small (HF layout, tied lm_head counted once)           124,439,808 params, 148 tensors
    decoder1b  a Llama-3.2-1B-shaped decoder (GQA, tied embedding), bf16  1,235,814,400 params, 146 tensors

plus two synthetic families for the sweeps: a fixed total split into N equal tensors, and a fixed
count of tensors of growing total size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ParamSet:
    name: str
    shapes: Tuple[Shape, ...]
    dtype: torch.dtype = torch.float32
    note: str = ""
    kind: str = "model"  # "model", "count-sweep" or "size-sweep"

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _bn(c: int) -> List[Shape]:
    return [(c,), (c,)]  # weight, bias (running stats are buffers, not params)


def resnet20_cifar() -> ParamSet:
    """ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64, parameter-free shortcuts)."""
    shapes: List[Shape] = [(16, 3, 3, 3)] + _bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            shapes += [(width, cin, 3, 3)] + _bn(width) + [(width, width, 3, 3)] + _bn(width)
            cin = width
    shapes += [(10, 64), (10,)]
    return ParamSet("resnet20", tuple(shapes), note="ResNet-20 for CIFAR-10")


def resnet50() -> ParamSet:
    """torchvision resnet50: bottlenecks [3, 4, 6, 3], expansion 4, 1x1 downsample + BN."""
    shapes: List[Shape] = [(64, 3, 7, 7)] + _bn(64)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, cin, 1, 1)] + _bn(width)
            shapes += [(width, width, 3, 3)] + _bn(width)
            shapes += [(out, width, 1, 1)] + _bn(out)
            if b == 0:
                shapes += [(out, cin, 1, 1)] + _bn(out)
            cin = out
    shapes += [(1000, 2048), (1000,)]
    return ParamSet("resnet50", tuple(shapes), note="ResNet-50 (ImageNet)")


def gpt2_small() -> ParamSet:
    """GPT-2 small: vocab 50257, context 1024, 12 layers of width 768 (HF GPT2LMHeadModel)."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes: List[Shape] = [(v, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn c_attn, c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp c_fc, c_proj
    shapes += [(d,), (d,)]  # ln_f
    return ParamSet("gpt2", tuple(shapes), note="GPT-2 small (124M)")


def decoder_1b(dtype: torch.dtype = torch.bfloat16) -> ParamSet:
    """Llama-3.2-1B shapes: vocab 128256, width 2048, 16 layers, 32 q / 8 kv heads, MLP 8192."""
    d, v, layers, kv, ffn = 2048, 128256, 16, 512, 8192
    shapes: List[Shape] = [(v, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d)]  # attn norm, q, k, v, o
        shapes += [(d,), (ffn, d), (ffn, d), (d, ffn)]  # mlp norm, gate, up, down
    shapes += [(d,)]
    return ParamSet("decoder1b", tuple(shapes), dtype=dtype, note="1.2B decoder (Llama-3.2-1B shapes), bf16")


def count_sweep_set(total: int, count: int) -> ParamSet:
    """``count`` equal 1-D tensors holding ``total`` elements between them (rounded down)."""
    each = max(total // count, 1)
    return ParamSet(f"count{count}", tuple((each,) for _ in range(count)),
                    note=f"{count} tensors x {each:,}", kind="count-sweep")


def size_sweep_set(total: int, count: int = 100) -> ParamSet:
    each = max(total // count, 1)
    return ParamSet(f"size{_short(total)}", tuple((each,) for _ in range(count)),
                    note=f"{count} tensors x {each:,}", kind="size-sweep")


def _short(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


MODEL_SETS = {
    "resnet20": resnet20_cifar,
    "resnet50": resnet50,
    "gpt2": gpt2_small,
    "decoder1b": decoder_1b,
}


def count_sweep(device: str) -> List[ParamSet]:
    """10 to 10,000 tensors holding a fixed total (4M params on CPU, 16M on GPU)."""
    total = (1 << 24) if device == "cuda" else (1 << 22)
    return [count_sweep_set(total, c) for c in (10, 100, 1000, 10000)]


def size_sweep(device: str) -> List[ParamSet]:
    """100 tensors holding 1M to 64M params (to 1G on GPU)."""
    sizes = [1 << 20, 1 << 22, 1 << 24, 1 << 26]
    if device == "cuda":
        sizes += [1 << 28, 1 << 30]
    return [size_sweep_set(s, 100) for s in sizes]


def sets_for(device: str, full: bool) -> List[ParamSet]:
    """The sets one run measures: quick default or --full, per device kind."""
    gpu = device == "cuda"
    out = [resnet20_cifar(), resnet50()]
    if gpu:
        out.append(gpt2_small())
    if not full:
        return out
    out.append(decoder_1b() if gpu else gpt2_small())
    return out + count_sweep(device) + size_sweep(device)


def parse_sets(spec: str, device: str) -> List[ParamSet]:
    """A comma list of model set names and/or ``counts`` / ``sizes`` (the sweeps)."""
    out: List[ParamSet] = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        if name == "counts":
            out += count_sweep(device)
        elif name == "sizes":
            out += size_sweep(device)
        elif name in MODEL_SETS:
            out.append(by_name(name))
        else:
            raise ValueError(f"unknown set {name!r}: use {', '.join(MODEL_SETS)}, counts or sizes")
    return out


def by_name(name: str) -> ParamSet:
    return MODEL_SETS[name]()


EXPECTED = {  # published parameter / tensor counts
    "resnet20": (269_722, 59),
    "resnet50": (25_557_032, 161),
    "gpt2": (124_439_808, 148),
    "decoder1b": (1_235_814_400, 146),
}


def check_counts(sets: Sequence[ParamSet] = ()) -> None:
    for name, (numel, count) in EXPECTED.items():
        ps = by_name(name)
        assert (ps.numel, ps.n_tensors) == (numel, count), (name, ps.numel, ps.n_tensors)


if __name__ == "__main__":
    check_counts()
    for name in MODEL_SETS:
        ps = by_name(name)
        print(f"{name:10s} {ps.numel:>14,} params {ps.n_tensors:>4} tensors {ps.dtype_name()}")
