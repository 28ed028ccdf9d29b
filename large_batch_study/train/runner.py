"""One training run: the paper's protocol (cosine decay per epoch, no warm-up) for one optimizer and task."""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, List, Optional

import torch

from .lars import LARS

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


def cosine_factor(epoch: int, epochs: int) -> float:
    """The paper's schedule: lr_m = lr_0 * 0.5 * (1 + cos(m * pi / E)), m = 0..E-1, per epoch."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_run(task, data, model_name: str, opt_name: str, batch_size: int, lr: float, seed: int,
              epochs: int, momentum: float = 0.9, weight_decay: float = 1e-4,
              device: torch.device = torch.device("cpu"), backend: str = "auto",
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train from the seed's initialization; returns curves and final metrics (JSON-ready).
    ``task`` (large_batch_study/train/tasks.py) supplies the model, the epoch's batches and the evaluation."""
    torch.manual_seed(seed)  # same initial weights for every optimizer and batch size
    model = task.build_model(model_name, data.info).to(device)
    clip = task.msgd_clip if opt_name == "msgd" else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falls back to the slow 'reference'.*")
        opt = make_optimizer(opt_name, model.parameters(), lr, momentum, weight_decay, backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda m: cosine_factor(m, epochs))
        gen = torch.Generator().manual_seed(10_000 + seed)
        curves: List[dict] = []
        diverged = False
        steps = 0

        def step(loss):
            nonlocal steps
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            steps += 1

        t0 = time.perf_counter()
        for epoch in range(epochs):
            te = time.perf_counter()
            model.train()
            lr_now = opt.param_groups[0]["lr"]
            stats = task.train_epoch(model, step, data.train, batch_size, gen)
            sched.step()
            train_loss = stats["train_loss"]
            rec = {"epoch": epoch + 1, "lr": lr_now, **stats, "train_time_s": time.perf_counter() - te}
            if not math.isfinite(train_loss):
                diverged = True
            last = epoch == epochs - 1 or diverged
            # every epoch: the split of the task's figure; the other one (the image task's validation
            # split, which only selects the lr; the text task's test split) once, at the end
            for split in ("val", "test"):
                if last or split == task.curve_split:
                    rec.update({f"{split}_{k}": v for k, v in task.evaluate(model, getattr(data, split)).items()})
            curves.append(rec)
            if progress:
                progress(f"epoch {epoch + 1}/{epochs} lr {lr_now:.4g} train_loss {train_loss:.4f} "
                         f"({rec['train_time_s']:.1f}s)"
                         + "".join(f" {k} {rec[k]:.4f}" for k in task.progress_keys() if k in rec))
            if diverged:
                break
    final = curves[-1]
    return {
        "model": model_name, "optimizer": opt_name, "batch_size": batch_size, "lr": lr, "seed": seed,
        "epochs": epochs, **task.run_settings(), "grad_clip": clip, "steps": steps, "diverged": diverged,
        "params": sum(p.numel() for p in model.parameters()),
        "time_s": time.perf_counter() - t0,
        "final": {k: final.get(k) for k in task.final_keys()},
        "curves": curves,
    }
