"""LR selection, the results table (a miniature of the paper's Table 2 or 6) and Figure-2/3-style
plots, for either task of large_batch_study/train/tasks.py."""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

from .runner import LABELS


def _key(r: dict):
    return (r["model"], r["optimizer"], r["batch_size"])


def select_lr(task, runs: List[dict], model: str, opt: str, bs: int, seed: int) -> Optional[dict]:
    """The grid's choice: the best final value of the task's validation metric (``task.select``: the
    image task's accuracy, ties to the lower validation loss; the text task's loss), then the lower
    lr. Only runs of ``seed`` (the grid seed) take part; the test split is never looked at."""
    cand = [r for r in runs if _key(r) == (model, opt, bs) and r["seed"] == seed and r.get("phase") == "grid"]
    if not cand:
        return None

    def finite(v):
        return v is not None and math.isfinite(v)

    def score(r):
        f = r["final"]
        v = f[task.select]
        primary = math.inf if r["diverged"] or not finite(v) else (-v if task.higher_is_better else v)
        return (primary, f["val_loss"] if finite(f["val_loss"]) else math.inf, r["lr"])

    cand.sort(key=score)
    best = cand[0]
    lrs = sorted(r["lr"] for r in cand)
    return {
        "model": model, "optimizer": opt, "batch_size": bs, "grid": lrs,
        task.select: {repr(r["lr"]): r["final"][task.select] for r in sorted(cand, key=lambda r: r["lr"])},
        "diverged": sorted(r["lr"] for r in cand if r["diverged"]),
        "chosen_lr": best["lr"],
        "at_grid_edge": len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]),
    }


def summarize(task, runs: List[dict], selection: List[dict]) -> List[dict]:
    """One row per (model, optimizer, batch size): the task's test metric of every seed at the chosen lr."""
    metric = task.table_metric
    rows = []
    for sel in selection:
        k = (sel["model"], sel["optimizer"], sel["batch_size"])
        rs = [r for r in runs if _key(r) == k and r["lr"] == sel["chosen_lr"]]
        rs.sort(key=lambda r: r["seed"])
        vals = [r["final"][metric] for r in rs]
        losses = [r["final"]["test_loss"] for r in rs]
        tl = [r["final"]["train_loss"] for r in rs]
        rows.append({
            "model": k[0], "optimizer": k[1], "batch_size": k[2], "lr": sel["chosen_lr"],
            "seeds": [r["seed"] for r in rs], metric: vals, "test_loss": losses,
            f"{metric}_mean": statistics.fmean(vals), f"{metric}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "test_loss_mean": statistics.fmean(losses), "train_loss_mean": statistics.fmean(tl),
            "at_grid_edge": sel["at_grid_edge"], "diverged": any(r["diverged"] for r in rs),
        })
    return rows


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def table_lines(task, rows: List[dict], markdown: bool = False) -> List[str]:
    """Per model: optimizers down, batch sizes across: the task's test metric (+- std over seeds)."""
    out: List[str] = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        mr = [r for r in rows if r["model"] == model]
        bss = sorted({r["batch_size"] for r in mr})
        opts = list(dict.fromkeys(r["optimizer"] for r in mr))
        cell = {(r["optimizer"], r["batch_size"]): r for r in mr}

        def fmt(r):
            if r is None:
                return "-"
            return task.cell(r) + f" (lr {_fmt_lr(r['lr'])}{'*' if r['at_grid_edge'] else ''})"

        head = ["optimizer"] + [task.cell_head(b) for b in bss]
        if len(bss) > 1:
            head.append(task.change_head(bss[0], bss[-1]))
        body = []
        for o in opts:
            line = [LABELS.get(o, o)] + [fmt(cell.get((o, b))) for b in bss]
            if len(bss) > 1:
                a, z = cell.get((o, bss[0])), cell.get((o, bss[-1]))
                line.append(task.change(a, z) if a and z else "-")
            body.append(line)
        if markdown:
            out.append(f"**{model}**")
            out.append("")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(l) + " |" for l in body]
            out.append("")
        else:
            widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
            out.append(f"== {model} ==")
            out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
            out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in body]
            out.append("")
    out.append("(* = chosen lr at the edge of its grid)")
    return out


def plot_curves(task, runs: List[dict], rows: List[dict], path_prefix: str) -> List[str]:
    """Per model, a 2 x len(batch sizes) figure like the paper's Figures 2 and 3: training loss (top)
    and the task's per-epoch curve (bottom: test accuracy, or validation perplexity), one line per
    optimizer at its chosen lr (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = f"{task.curve_split}_{task.curve_metric}"
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = [r for r in rows if r["model"] == model]
        bss = sorted({r["batch_size"] for r in mr})
        fig, axes = plt.subplots(2, len(bss), figsize=(5.5 * len(bss), 8), squeeze=False)
        for j, bs in enumerate(bss):
            for row in [r for r in mr if r["batch_size"] == bs]:
                rs = [r for r in runs if (r["model"], r["optimizer"], r["batch_size"], r["lr"]) ==
                      (model, row["optimizer"], bs, row["lr"])]
                n = min(len(r["curves"]) for r in rs)
                ep = [c["epoch"] for c in rs[0]["curves"][:n]]
                tl = [statistics.fmean(r["curves"][i]["train_loss"] for r in rs) for i in range(n)]
                cv = [task.curve_scale * statistics.fmean(r["curves"][i].get(curve) or 0.0 for r in rs)
                      for i in range(n)]
                label = f"{LABELS.get(row['optimizer'], row['optimizer'])} (lr {_fmt_lr(row['lr'])})"
                axes[0][j].plot(ep, tl, marker=".", label=label)
                axes[1][j].plot(ep, cv, marker=".", label=label)
            axes[0][j].set_title(f"{model}: training loss, B = {bs}")
            axes[0][j].set_yscale("log")
            axes[1][j].set_title(f"{model}: {task.curve_label}, B = {bs}")
            for i in (0, 1):
                axes[i][j].set_xlabel("epoch")
                axes[i][j].grid(alpha=0.3)
                axes[i][j].legend(fontsize=8)
        nseeds = max(len(r["seeds"]) for r in mr)
        fig.suptitle(f"{task.title}, {model}: each optimizer at its chosen lr"
                     + (f", mean of {nseeds} seeds" if nseeds > 1 else ""))
        fig.tight_layout()
        path = f"{path_prefix}_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
