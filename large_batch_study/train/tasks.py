"""The two tasks of the miniature: what differs between them (data, one training epoch, evaluation,
the validation metric that picks the lr, the test metric of the table, the per-epoch curve of the
figure). large_batch_study/train/runner.py runs the protocol they share; report.py formats through them.

- ``fmnist``: Fashion-MNIST image classification, like the paper's Section 7.1 (Table 2, Figure 2).
- ``fortunes``: character-level language modelling of Debian's fortunes, like the paper's Section 7.2
  (2-layer LSTM on Wikitext-2, Table 6, Figure 3).

A task is rebuilt from a results file's settings (``make_task``), so --report-only needs no options.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .data import Split, batches
from .models import build_model
from .text import TextSplit, batchify, bptt_windows


class ImageTask:
    """Fashion-MNIST classification. Its attributes and methods are what every task provides."""

    name = "fmnist"
    title = "Fashion-MNIST"
    model_prefixes = ("cnn", "resnet")
    table_caption = "Test accuracy (%) / test loss at each method's chosen lr — a miniature of the paper's Table 2"
    seed_caption = "Test accuracy (%)"
    select = "val_acc"  # the final validation metric the lr grid is chosen on ...
    higher_is_better = True  # ... and its direction
    select_label = "validation accuracy"
    selection_rule = "best final validation accuracy of the grid seed (ties: lower validation loss)"
    table_metric = "test_acc"  # mean ± std over seeds in the table
    curve_split, curve_metric = "test", "acc"  # the figure's lower row, every epoch (Figure 2: test accuracy)
    curve_label = "test accuracy (%)"
    curve_scale = 100.0
    msgd_clip: Optional[float] = None  # the paper clips gradients for MSGD on the LSTM only

    def settings(self) -> dict:
        return {"task": self.name, "task_args": {}}

    def run_settings(self) -> dict:
        """What, beyond the epochs and the data size, makes two runs the same (for --resume)."""
        return {}

    def build_model(self, name: str, info: dict):
        """The model ``name`` for the data described by ``info`` (the image models are fixed-size)."""
        return build_model(name)

    def train_epoch(self, model, step: Callable, split: Split, batch_size: int,
                    gen: torch.Generator) -> Dict[str, float]:
        """One pass over the training split; ``step(loss)`` makes one optimizer update."""
        device = split.y.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for x, y in batches(split, batch_size, gen):
            out = model(x)
            loss = F.cross_entropy(out, y)
            step(loss)
            loss_sum += loss.detach() * y.shape[0]
            correct += (out.detach().argmax(1) == y).sum()
        return {"train_loss": loss_sum.item() / len(split), "train_acc": correct.item() / len(split)}

    @torch.no_grad()
    def evaluate(self, model, split: Split, chunk: int = 2048) -> Dict[str, float]:
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

    def final_keys(self):
        return ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc")

    def progress_keys(self):
        return ("val_acc", "test_acc")

    def run_summary(self, f: dict) -> str:
        return f"val acc {f['val_acc']:.4f}  test acc {f['test_acc']:.4f}  test loss {f['test_loss']:.4f}"

    def describe(self, d: dict) -> str:
        return f"Fashion-MNIST, {d['n_train']} train / {d['n_val']} validation / {d['n_test']} test images"

    # the table: one cell per optimizer and batch size, mean over seeds
    def cell_head(self, bs: int) -> str:
        return f"B={bs}: test acc % / loss (lr)"

    def cell(self, r: dict) -> str:
        s = f"{100 * r['test_acc_mean']:.2f}"
        if len(r["seeds"]) > 1:
            s += f" ± {100 * r['test_acc_std']:.2f}"
        return s + f" / {r['test_loss_mean']:.3f}"

    def change_head(self, small: int, large: int) -> str:
        return f"acc change {small}->{large}"

    def change(self, a: dict, z: dict) -> str:
        return f"{100 * (z['test_acc_mean'] - a['test_acc_mean']):+.2f}"

    def seed_value(self, v: float) -> str:
        return f"{100 * v:.2f}"


DEFAULT_BPTT = 32  # characters per window, near the paper's (the example's) 35 words


def perplexity(loss: float) -> float:
    return math.inf if loss > 700 else math.exp(loss)  # exp overflows past ~709 (a diverged run)


class TextTask:
    """Character-level LM: B parallel streams of the training text, windows of ``bptt`` characters,
    the LSTM state carried from window to window (detached), as in PyTorch's word_language_model."""

    name = "fortunes"
    title = "Debian fortunes (character LM)"
    model_prefixes = ("lstm",)
    table_caption = ("Test perplexity (per character) / bits per character at each method's chosen lr"
                     " — a miniature of the paper's Table 6")
    seed_caption = "Test perplexity"
    select = "val_loss"
    higher_is_better = False
    select_label = "validation loss, nats per character"
    selection_rule = "lowest final validation loss (nats per character) of the grid seed"
    table_metric = "test_ppl"
    curve_split, curve_metric = "val", "ppl"  # Figure 3: validation perplexity
    curve_label = "validation perplexity"
    curve_scale = 1.0
    # PyTorch word_language_model's --clip 0.25, whose other defaults are the paper's LSTM setting
    msgd_clip = 0.25
    eval_streams = 32  # validation and test: 32 streams of ~4k characters (few cold LSTM starts)

    def __init__(self, bptt: int = DEFAULT_BPTT):
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        self.bptt = bptt

    def settings(self) -> dict:
        return {"task": self.name, "task_args": {"bptt": self.bptt},
                "eval_streams": self.eval_streams,
                "msgd_grad_clip": f"torch.nn.utils.clip_grad_norm_(params, {self.msgd_clip}) before each MSGD step",
                "loss": "cross-entropy per character in nats; perplexity = exp(loss), bits per char = loss / ln 2"}

    def run_settings(self) -> dict:
        return {"bptt": self.bptt}

    def build_model(self, name: str, info: dict):
        return build_model(name, vocab_size=info["vocab_size"])

    def train_epoch(self, model, step, split: TextSplit, batch_size: int, gen) -> Dict[str, float]:
        # the fortunes in a new order every epoch (the image task's reshuffle), cut into streams
        data = batchify(split.shuffled(gen), batch_size)
        loss_sum = torch.zeros((), device=data.device)
        hidden, n = None, 0
        for x, y in bptt_windows(data, self.bptt):
            if hidden is not None:
                hidden = tuple(h.detach() for h in hidden)  # truncated BPTT: no gradient into the past
            out, hidden = model(x, hidden)
            loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
            step(loss)
            loss_sum += loss.detach() * y.numel()
            n += y.numel()
        return {"train_loss": loss_sum.item() / n}

    @torch.no_grad()
    def evaluate(self, model, split: TextSplit) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        data = batchify(split.ids, self.eval_streams)
        loss_sum, n, hidden = 0.0, 0, None
        for x, y in bptt_windows(data, self.bptt):
            out, hidden = model(x, hidden)
            loss_sum += F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
        model.train(was_training)
        loss = loss_sum / n
        return {"loss": loss, "ppl": perplexity(loss), "bpc": loss / math.log(2)}

    def final_keys(self):
        return ("train_loss", "val_loss", "val_ppl", "test_loss", "test_ppl", "test_bpc")

    def progress_keys(self):
        return ("val_ppl", "test_ppl")

    def run_summary(self, f: dict) -> str:
        return f"val ppl {f['val_ppl']:.3f}  test ppl {f['test_ppl']:.3f}  test bpc {f['test_bpc']:.3f}"

    def describe(self, d: dict) -> str:
        return (f"Debian fortunes, characters: {d['n_train']} train / {d['n_val']} validation / "
                f"{d['n_test']} test ({d['train_fortunes']} / {d['val_fortunes']} / {d['test_fortunes']} "
                f"of {d['fortunes']} fortunes; vocabulary {d['vocab_size']} with <unk>, <eof>); "
                f"BPTT {self.bptt}, MSGD clipped at {self.msgd_clip}")

    def cell_head(self, bs: int) -> str:
        return f"B={bs}: test ppl / bits per char (lr)"

    def cell(self, r: dict) -> str:
        s = f"{r['test_ppl_mean']:.3f}"
        if len(r["seeds"]) > 1:
            s += f" ± {r['test_ppl_std']:.3f}"
        return s + f" / {r['test_loss_mean'] / math.log(2):.3f}"

    def change_head(self, small: int, large: int) -> str:
        return f"ppl change {small}->{large}"

    def change(self, a: dict, z: dict) -> str:
        return f"{z['test_ppl_mean'] - a['test_ppl_mean']:+.3f}"

    def seed_value(self, v: float) -> str:
        return f"{v:.3f}"


TASKS = {"fmnist": ImageTask, "fortunes": TextTask}


def make_task(settings: dict):
    """The task of a results file (files written before the text task existed are fmnist's)."""
    return TASKS[settings.get("task", "fmnist")](**settings.get("task_args", {}))
