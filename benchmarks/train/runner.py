"""One training run: the paper's protocol (cosine decay per epoch, no warm-up) for one optimizer."""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .data import Data, Split, batches
from .lars import LARS
from .models import build_model

OPTIMIZERS = ("msgd", "lars", "sngm", "sngm_tensor", "sngd", "adam")
LABELS = {"msgd": "MSGD", "lars": "LARS", "sngm": "SNGM", "sngm_tensor": "SNGM block-wise",
          "sngd": "SNGD", "adam": "Adam"}


def make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float,
                   backend: str = "auto"):
    if name == "msgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name in ("sngm", "sngm_tensor", "sngd"):
        from sngm_ext import SNGM

        return SNGM(params, lr=lr, momentum=0.0 if name == "sngd" else momentum,
                    weight_decay=weight_decay, norm="tensor" if name == "sngm_tensor" else "global",
                    backend=backend)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")


def sngm_backend_name(device: torch.device, backend: str = "auto") -> str:
    from sngm_ext import resolve_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return resolve_backend(backend, device)[0]
        except Exception as e:  # noqa: BLE001 - recorded, the run itself will raise
            return f"unavailable ({e})"


@torch.no_grad()
def evaluate(model, split: Split, chunk: int = 2048) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(split), chunk):
        x, y = split.x[start : start + chunk], split.y[start : start + chunk]
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(len(split), 1)
    return {"loss": loss_sum / n, "acc": correct / n}


def cosine_factor(epoch: int, epochs: int) -> float:
    """The paper's schedule: lr_m = lr_0 * 0.5 * (1 + cos(m * pi / E)), m = 0..E-1, per epoch."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_run(data: Data, model_name: str, opt_name: str, batch_size: int, lr: float, seed: int,
              epochs: int, momentum: float = 0.9, weight_decay: float = 1e-4,
              device: torch.device = torch.device("cpu"), backend: str = "auto",
              eval_test_every_epoch: bool = True,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train from the seed's initialization; returns curves and final metrics (JSON-ready)."""
    torch.manual_seed(seed)  # same initial weights for every optimizer and batch size
    model = build_model(model_name).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the slow 'reference'.*")
        opt = make_optimizer(opt_name, model.parameters(), lr, momentum, weight_decay, backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda m: cosine_factor(m, epochs))
        gen = torch.Generator().manual_seed(10_000 + seed)
        curves: List[dict] = []
        diverged = False
        steps = 0
        t0 = time.perf_counter()
        for epoch in range(epochs):
            te = time.perf_counter()
            model.train()
            lr_now = opt.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for x, y in batches(data.train, batch_size, gen):
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                loss_sum += loss.detach() * y.shape[0]
                correct += (out.detach().argmax(1) == y).sum()
            sched.step()
            train_loss = loss_sum.item() / len(data.train)
            rec = {"epoch": epoch + 1, "lr": lr_now, "train_loss": train_loss,
                   "train_acc": correct.item() / len(data.train), "train_time_s": time.perf_counter() - te}
            if not math.isfinite(train_loss):
                diverged = True
            last = epoch == epochs - 1 or diverged
            if last:  # the validation split only selects the lr: evaluated once, at the end
                v = evaluate(model, data.val)
                rec.update(val_loss=v["loss"], val_acc=v["acc"])
            if eval_test_every_epoch or last:
                t = evaluate(model, data.test)
                rec.update(test_loss=t["loss"], test_acc=t["acc"])
            curves.append(rec)
            if progress:
                progress(f"epoch {epoch + 1}/{epochs} lr {lr_now:.4g} train_loss {train_loss:.4f} "
                         f"({rec['train_time_s']:.1f}s)"
                         + (f" val_acc {rec['val_acc']:.4f}" if "val_acc" in rec else "")
                         + (f" test_acc {rec['test_acc']:.4f}" if "test_acc" in rec else ""))
            if diverged:
                break
    final = curves[-1]
    return {
        "model": model_name, "optimizer": opt_name, "batch_size": batch_size, "lr": lr, "seed": seed,
        "epochs": epochs, "steps": steps, "diverged": diverged,
        "params": sum(p.numel() for p in model.parameters()),
        "time_s": time.perf_counter() - t0,
        "final": {k: final.get(k) for k in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc")},
        "curves": curves,
    }
