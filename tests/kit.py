"""The test kit every test module uses: tiny models, deterministic losses, a training loop,
snapshots and comparisons, the CPU backends and the tools the tests drive SNGM through.

Test modules import from here (and from the parity harness ``scenarios.py`` and the independent
oracle ``oracle.py``), never from one another. Each module keeps its own data (a :class:`Task`
with its seed and shapes) so that what it asserts is what it asserted before the kit existed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import pytest
import torch
from torch import nn

import sngm_ext
from bounds import elementwise_bounds
from scenarios import NO_MOMENTUM_MU, grads_for, make_params
from sngm_ext import SNGM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- backends and tools

# Every backend that runs on CPU tensors here (conftest's ``backend`` fixture runs each).
CPU_BACKENDS = ["reference", "triton", "cpu"]


def backend_available(name: str) -> bool:
    """Whether backend ``name`` runs on CPU tensors in this process."""
    try:
        sngm_ext.resolve_backend(name, torch.device("cpu"))
        return True
    except sngm_ext.BackendUnavailable:
        return False


def import_tool(module: str):
    """A tool the tests drive SNGM through (lightning, transformers, ...): the module, or skip the
    calling test module where it is not installed; in CI (scripts/setup.sh installs them) a missing
    one is an error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            raise RuntimeError(f"{module} must be installed in CI (scripts/setup.sh): {e}") from e
        pytest.skip(f"{module} is not installed ({e})", allow_module_level=True)


def importable(folder: str) -> str:
    """Put the checkout's ``folder`` (benchmarks, large_batch_study, ...) on sys.path, once; its
    absolute path."""
    path = os.path.join(ROOT, folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return path


def load_script(path: str, name: str):
    """The module of a script that is not importable by name (a CLI file), executed once more."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- models


def mlp(widths: Sequence[int], act=nn.Tanh, seed: int = 0, dtype=torch.float32,
        bias: Union[bool, Sequence[bool]] = True) -> nn.Sequential:
    """Linear(widths[i], widths[i + 1]) layers with ``act`` between them, initialized after
    ``torch.manual_seed(seed)``; ``bias`` for every layer or per layer."""
    biases = [bias] * (len(widths) - 1) if isinstance(bias, bool) else list(bias)
    assert len(biases) == len(widths) - 1, "one bias flag per layer"
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, has_bias in enumerate(biases):
        if i:
            layers.append(act())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=has_bias))
    return nn.Sequential(*layers).to(dtype)


def convnet(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    """Two convolutions (the second without bias), pooling and a Linear head: 5 classes from
    3-channel images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).to(dtype)


# ---------------------------------------------------------------- data and losses


@dataclass(frozen=True)
class Task:
    """A deterministic loss per step: the batch of step ``s`` is drawn from
    ``torch.Generator().manual_seed(seed + s)``, inputs first. ``targets`` is a number of classes
    (integer labels, cross entropy on the float32 logits) or a shape (Gaussian targets, the mean
    squared error ``(m(x) - y).square().mean()`` in the model's dtype)."""

    inputs: Tuple[int, ...]
    targets: Union[int, Tuple[int, ...]]
    seed: int

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + step)
        x = torch.randn(self.inputs, generator=g)
        if isinstance(self.targets, int):
            return x, torch.randint(0, self.targets, (self.inputs[0],), generator=g)
        return x, torch.randn(self.targets, generator=g)

    def loss(self, m: nn.Module, step: int) -> torch.Tensor:
        dtype = next(m.parameters()).dtype
        x, y = self.batch(step)
        out = m(x.to(dtype))
        if isinstance(self.targets, int):
            return nn.functional.cross_entropy(out.float(), y)
        return (out - y.to(dtype)).square().mean()


def train(m: nn.Module, opt: torch.optim.Optimizer,
          loss: Callable[[nn.Module, int], torch.Tensor], steps: int, start: int = 0,
          set_to_none: bool = True, accumulate: int = 1, between: Optional[Callable] = None,
          step: Optional[Callable] = None) -> List[torch.Tensor]:
    """``steps`` optimizer steps, the first one on ``loss(m, start)``: zero_grad, ``accumulate``
    backwards (losses ``start * accumulate`` on), ``between(m, opt, t)`` if given, then
    ``step()`` (default ``opt.step``). Returns a copy of ``opt.grad_norm`` after each step where
    the optimizer has one (SNGM), else an empty list."""
    norms = []
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=set_to_none)
        for a in range(accumulate):
            loss(m, t * accumulate + a).backward()
        if between is not None:
            between(m, opt, t)
        (step or opt.step)()
        if hasattr(opt, "grad_norm"):
            norms.append(opt.grad_norm.clone())
    return norms


@dataclass(frozen=True)
class Problem:
    """A test module's training problem: how its model is built (``build(seed=, dtype=)``, e.g.
    ``functools.partial(mlp, widths)``) and the task it is trained on."""

    build: Callable[..., nn.Module]
    task: Task

    def model(self, seed: int = 0, dtype=torch.float32) -> nn.Module:
        return self.build(seed=seed, dtype=dtype)

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch(step)

    def loss(self, m: nn.Module, step: int) -> torch.Tensor:
        return self.task.loss(m, step)

    def train(self, m: nn.Module, opt: torch.optim.Optimizer, steps: int,
              **kw) -> List[torch.Tensor]:
        """:func:`train` on this problem's loss (same keywords)."""
        return train(m, opt, self.task.loss, steps, **kw)


# ---------------------------------------------------------------- snapshots and comparisons


def values(source: Union[nn.Module, Iterable[torch.Tensor]]) -> List[torch.Tensor]:
    """Detached copies of a module's params, or of the given tensors."""
    tensors = source.parameters() if isinstance(source, nn.Module) else source
    return [t.detach().clone() for t in tensors]


class Snapshot(NamedTuple):
    params: List[torch.Tensor]
    state: dict  # the optimizer's state_dict()["state"], its tensors copied


def snapshot(m: nn.Module, opt: torch.optim.Optimizer) -> Snapshot:
    state = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
             for k, v in opt.state_dict()["state"].items()}
    return Snapshot(values(m), state)


def assert_equal(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
    """The same number of tensors, each bitwise equal to its partner."""
    assert len(xs) == len(ys), (len(xs), len(ys))
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert torch.equal(x, y), f"tensor {i} differs"


def assert_same(a: Snapshot, b: Snapshot) -> None:
    """Bitwise the same params and optimizer state."""
    assert_equal(a.params, b.params)
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert a.state[k].keys() == b.state[k].keys(), k
        for kk in a.state[k]:
            x, y = a.state[k][kk], b.state[k][kk]
            assert (x is None and y is None) or torch.equal(x, y), (k, kk)


class Magnitudes:
    """What the bounds of two runs need from the reference run (bounds.elementwise_bounds): per
    param of ``opt`` (param_groups order), the largest |w| and |u| it reached after any step, its
    group's largest lr and its momentum; the number of steps; recorded by step hooks (|w| before
    and after each step)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.steps = 0
        self.rows: dict = {}  # id(param) -> [max_w, max_u, lr, beta]
        self.params: List[torch.Tensor] = []
        opt.register_step_pre_hook(lambda o, a, k: self._record(o, after=False))
        opt.register_step_post_hook(lambda o, a, k: self._record(o, after=True))

    def _record(self, opt, after: bool) -> None:
        self.steps += after
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in self.rows:
                    self.rows[id(p)] = [0.0, 0.0, 0.0, group["momentum"]]
                    self.params.append(p)
                row = self.rows[id(p)]
                row[0] = max(row[0], p.detach().abs().max().item() if p.numel() else 0.0)
                if after:
                    buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
                    row[1] = max(row[1], NO_MOMENTUM_MU if buf is None else
                                 buf.abs().max().item() if buf.numel() else 0.0)
                    row[2] = max(row[2], float(group["lr"]))

    def bounds(self, dtype) -> List[Tuple[float, float]]:
        """(bound on |du|, bound on |dw|) per param after self.steps steps."""
        n_terms = sum(p.numel() for p in self.params)
        return [elementwise_bounds(dtype, self.steps, lr, beta, mw, mu, n_terms)
                for mw, mu, lr, beta in (self.rows[id(p)] for p in self.params)]


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual - expected| <= bound element by element (``bound`` a float or a tensor of
    expected's shape, from bounds.py), in fp64."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.detach().double() - expected.detach().double()).abs()
    over = err > torch.as_tensor(bound, dtype=torch.float64)
    if over.any():
        i = int(over.flatten().nonzero()[0])
        b = torch.as_tensor(bound, dtype=torch.float64).expand_as(err).flatten()[i].item()
        raise AssertionError(f"{what}: {int(over.sum())} of {err.numel()} elements off, first at "
                             f"{i}: error {err.flatten()[i].item():.3g} > bound {b:.3g}")


def assert_runs_close(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                      mags: Magnitudes, dtype, momentum: bool = False) -> None:
    """Params (or, with ``momentum``, momentum buffers) of a run against the reference run whose
    optimizer ``mags`` watched, in its param order, within bounds.elementwise_bounds.

    Two runs of the same loop on two backends compute every element with the same operations on
    the same values while their params agree bitwise: only the norm's summation order differs, and
    a flip it causes is what the bounds count, a few units of the dtype at each element's scale
    per step (scenarios.py's doc). Where the grads come from a model, a flipped unit also reaches
    the next steps' grads through the loss's curvature, by far less than a unit again over the few
    steps of these small models (lr ||H|| / ||g|| << 1); exact where no rounding flips, what these
    runs show in practice. A per-tensor norm or a dropped weight decay misses them by orders of
    magnitude."""
    assert len(got) == len(ref) == len(mags.params), (len(got), len(ref), len(mags.params))
    for i, (x, y, (du, dw)) in enumerate(zip(got, ref, mags.bounds(dtype))):
        assert x.shape == y.shape and x.dtype == y.dtype == dtype, (i, x.dtype, y.dtype)
        if not x.numel():
            continue
        bound = du if momentum else dw
        err = (x.detach().double() - y.detach().double()).abs().max().item()
        assert err <= bound, f"{'momentum' if momentum else 'param'} {i}: {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------- the trainers' problem


def regression_data(n: int = 64, d_in: int = 8,
                    d_out: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed samples the trainer tests (Lightning, transformers) and their plain loops share."""
    return (torch.randn(n, d_in, generator=torch.Generator().manual_seed(0)),
            torch.randn(n, d_out, generator=torch.Generator().manual_seed(1)))


def trainer_net() -> nn.Sequential:
    return mlp((8, 16, 2), seed=2)


def trainer_opt(params, backend: str):
    """SNGM with weight decay and a per-step LambdaLR: what the trainer tests hand the trainer."""
    opt = SNGM(params, lr=0.05, momentum=0.9, weight_decay=1e-4, backend=backend)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)


# ---------------------------------------------------------------- shared checks


def check_non_finite_grad_skips_the_step(backend: str, dtype, bad: float,
                                         device="cpu") -> None:
    """A NaN/Inf in one grad: params and momentum untouched, the device-side counter grows, and a
    finite step afterwards goes through (the CPU and GPU tests run it)."""
    params = make_params(dtype, device=device)
    opt = SNGM([dict(params=params[:4]), dict(params=params[4:], nesterov=True, momentum=0.5)],
               lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    before = values(params)
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params if p in opt.state]
    grads = grads_for(params, 3)
    grads[6].view(-1)[1234] = bad
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.skipped_steps.device == params[0].device and opt.skipped_steps.item() == 1
    assert not torch.isfinite(opt.grad_norm)
    assert_equal(values(params), before)
    assert_equal([opt.state[p]["momentum_buffer"] for p in params if p in opt.state], bufs)
    for p, g in zip(params, grads_for(params, 4)):
        p.grad = g
    opt.step()
    assert opt.skipped_steps.item() == 1
    assert not torch.equal(params[3].detach(), before[3])
