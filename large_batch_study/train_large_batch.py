#!/usr/bin/env python3
"""Large-batch training in miniature: MSGD vs LARS vs SNGM (and block-wise SNGM, SNGD, Adam), the
paper's protocol (Zhao et al., Section 7): the same model and number of epochs for every optimizer and
batch size, cosine learning-rate decay per epoch with no warm-up, momentum 0.9, weight decay 1e-4, each
method's learning rate chosen on a validation split from a small grid, then test metrics on the
held-out test split. Two tasks:

- fmnist (default): a CNN on Fashion-MNIST (Section 7.1); test accuracy and loss.
- fortunes: a character-level 2-layer LSTM language model on Debian's fortunes (Section 7.2; the
  paper's is word-level on Wikitext-2); test perplexity and bits per character. MSGD's gradients
  are clipped, as in the paper.

    python large_batch_study/train_large_batch.py                          # results/train_full.*
    python large_batch_study/train_large_batch.py --quick                  # < 10 min on 2 CPU cores, lrs fixed
    python large_batch_study/train_large_batch.py --task fortunes          # results/train_text_full.*
    python large_batch_study/train_large_batch.py --task fortunes --quick  # < 4 min on 2 CPU cores, lrs fixed

Data: apt-get install -y dataset-fashion-mnist fortunes (IDX files in
/usr/share/datasets/fashion-mnist; text files in /usr/share/games/fortunes).
Writes <out>.json (every run's settings and per-epoch curves), <out>.md (the table) and
<out>_<model>.png (training loss and test accuracy or validation perplexity per epoch, like the
paper's Figures 2 and 3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from train.data import load_fashion_mnist  # noqa: E402
from train.models import MODELS  # noqa: E402
from train.report import plot_curves, select_lr, summarize, table_lines  # noqa: E402
from train.runner import LABELS, OPTIMIZERS, sngm_backend_name, train_run  # noqa: E402
from train.tasks import DEFAULT_BPTT, TASKS, ImageTask, TextTask, make_task  # noqa: E402
from train.text import load_fortunes  # noqa: E402

SCHEMA = "sngm-ext/train_large_batch/v1"
RESULTS = os.path.join(HERE, "results")

# Learning-rate grids, per task and optimizer, for the task's small and large batches. Spaced ~3x;
# LARS's lr is a relative step (lr * ||w|| per tensor), SNGM's an absolute one
# (||step|| <= lr / (1 - momentum)), block-wise SNGM moves every tensor by lr (so ~sqrt(#tensors)
# more in all), SNGD has no momentum; MSGD's steps on the LSTM are clipped (gradient norm <= 0.25).
GRIDS = {
    "fmnist": {
        "msgd": {"small": [0.01, 0.03, 0.1], "large": [0.1, 0.3, 1.0]},
        "lars": {"small": [0.001, 0.003, 0.01], "large": [0.01, 0.03, 0.1]},
        "sngm": {"small": [0.01, 0.03, 0.1], "large": [0.1, 0.3, 1.0]},
        "sngm_tensor": {"small": [0.003, 0.01, 0.03], "large": [0.03, 0.1, 0.3]},
        "sngd": {"small": [0.03, 0.1, 0.3], "large": [0.3, 1.0, 3.0]},
        "adam": {"small": [0.0003, 0.001, 0.003], "large": [0.001, 0.003, 0.01]},
    },
    # calibrated on the full run's sizes (seed 0, val loss): at B=16 the best lrs of a 2-epoch probe
    # were MSGD 3, LARS 0.03, SNGM 1, block-wise 0.3, SNGD 3, Adam 0.01; at B=256 (6 epochs) MSGD 10
    # (30 blew up), SNGM 1 (3 worse), block-wise 0.3, Adam 0.01, LARS 0.03, SNGD 3
    "fortunes": {
        "msgd": {"small": [1.0, 3.0, 10.0], "large": [3.0, 10.0, 30.0]},
        "lars": {"small": [0.01, 0.03, 0.1], "large": [0.03, 0.1, 0.3]},
        "sngm": {"small": [0.3, 1.0, 3.0], "large": [0.3, 1.0, 3.0]},
        "sngm_tensor": {"small": [0.1, 0.3, 1.0], "large": [0.1, 0.3, 1.0]},
        "sngd": {"small": [1.0, 3.0, 10.0], "large": [1.0, 3.0, 10.0]},
        "adam": {"small": [0.003, 0.01, 0.03], "large": [0.003, 0.01, 0.03]},
    },
}

# The full runs' choices (large_batch_study/results/train_full.json, train_text_full.json), used by --quick.
FIXED_LRS = {
    ("cnn", "msgd", 128): 0.03, ("cnn", "lars", 128): 0.01, ("cnn", "sngm", 128): 0.1,
    ("cnn", "sngm_tensor", 128): 0.03, ("cnn", "sngd", 128): 1.0, ("cnn", "adam", 128): 0.01,
    ("cnn", "msgd", 4096): 0.1, ("cnn", "lars", 4096): 0.03, ("cnn", "sngm", 4096): 0.3,
    ("cnn", "sngm_tensor", 4096): 0.1, ("cnn", "sngd", 4096): 1.0, ("cnn", "adam", 4096): 0.01,
    ("lstm", "msgd", 16): 3.0, ("lstm", "lars", 16): 0.03, ("lstm", "sngm", 16): 1.0,
    ("lstm", "sngm_tensor", 16): 0.3, ("lstm", "sngd", 16): 3.0, ("lstm", "adam", 16): 0.03,
    ("lstm", "msgd", 256): 10.0, ("lstm", "lars", 256): 0.1, ("lstm", "sngm", 256): 1.0,
    ("lstm", "sngm_tensor", 256): 1.0, ("lstm", "sngd", 256): 3.0, ("lstm", "adam", 256): 0.01,
}

# Per task: default batch sizes, the largest batch that takes the "small" grid, the output prefix,
# and the full and quick runs' sizes (train_subset: images for fmnist, characters for fortunes).
# fortunes, measured on 1 thread of 2 cores shared with another busy process, 150k training
# characters, BPTT 32: one epoch took 4.1-5.4 s at B=16 (295 updates), 3.6-5.2 s at B=256 (19),
# 4.2-5.7 s at B=512 (10); a validation pass (123k characters) ~0.75 s; a 6-epoch run 29-36 s. The
# full run's 60 runs (+ up to 12 grid-edge extensions) take ~35-40 min; quick's 12 runs ~2.5 min.
# B=256, not 512: in 60 updates SNGM and MSGD ended at 2.9-3.3 nats, near the unigram loss (3.32);
# in 114 updates they reached 2.4-2.5.
PRESETS = {
    "fmnist": dict(batch_sizes="128,4096", small_max=512, out="train",
                   full=dict(models="cnn", epochs=6, train_subset=16384, seeds="0,1,2"),
                   quick=dict(models="cnn", epochs=4, train_subset=16384, seeds="0")),
    "fortunes": dict(batch_sizes="16,256", small_max=64, out="train_text",
                     full=dict(models="lstm", epochs=6, train_subset=150_000, seeds="0,1,2"),
                     quick=dict(models="lstm", epochs=3, train_subset=100_000, seeds="0")),
}


def grid_for(task: str, opt: str, bs: int, overrides: dict) -> list:
    if (opt, bs) in overrides:
        return overrides[(opt, bs)]
    return list(GRIDS[task][opt]["small" if bs <= PRESETS[task]["small_max"] else "large"])


def parse_lr_override(items) -> dict:
    out = {}
    for item in items or []:
        try:
            head, vals = item.split("=")
            opt, bs = head.split("@")
            out[(opt, int(bs))] = [float(v) for v in vals.split(",")]
        except ValueError:
            raise SystemExit(f"--lr {item!r}: expected OPT@BATCH=LR[,LR...], e.g. sngm@4096=0.1,0.3,1")
    return out


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def report(result: dict, out: str, plots: bool = True) -> None:
    """The table on the terminal, <out>.md, and <out>_<model>.png from a run's JSON."""
    task = make_task(result["settings"])
    lines = table_lines(task, result["table"])
    print(f"\n{task.table_caption}")
    print("\n".join(lines))
    st, d = result["settings"], result["data"]
    seeds = st["seeds"]
    md = [f"Command: `{result['command']}`", "",
          f"{task.describe(d)}; {st['epochs']} epochs; batch sizes {st['batch_sizes']}; seeds {seeds}"
          + (" (mean ± std over seeds)" if len(seeds) > 1 else "")
          + f"; device {result['environment']['device']} ({result['environment']['threads']} threads); "
          f"training time of all {len(result['runs'])} runs {fmt_time(sum(r['time_s'] for r in result['runs']))}.", ""]
    md += table_lines(task, result["table"], markdown=True)
    if len(seeds) > 1:
        md += ["", f"{task.seed_caption} of each seed at the chosen lr:", ""]
        for r in result["table"]:
            md.append(f"- {r['model']} B={r['batch_size']} {LABELS[r['optimizer']]}: "
                      + ", ".join(task.seed_value(v) for v in r[task.table_metric]))
    if st["mode"] == "quick":
        md += ["", f"Learning rates, fixed from the full run ({task.select_label} here, seed {st['grid_seed']}):", ""]
    else:
        md += ["", f"Learning-rate grids ({task.select_label}, seed {st['grid_seed']}) and choices:", ""]
    for s in result["selection"]:
        va = ", ".join(f"{float(k):g}: {v:.4f}" for k, v in s[task.select].items())
        md.append(f"- {s['model']} B={s['batch_size']} {LABELS[s['optimizer']]}: {va} -> **{s['chosen_lr']:g}**"
                  + (" (at grid edge)" if s["at_grid_edge"] else "")
                  + (f"; diverged: {s['diverged']}" if s["diverged"] else ""))
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    if plots:
        for path in plot_curves(task, result["runs"], result["table"], out):
            print(f"plot: {path}")
    print(f"results: {out}.json, {out}.md  (wall time {fmt_time(result.get('wall_time_s', 0))})")


def default_out(task: str, quick: bool) -> str:
    return os.path.join(RESULTS, PRESETS[task]["out"] + ("_quick" if quick else "_full"))


def load_data(task: str, args, train_subset: int):
    if task == "fmnist":
        return load_fashion_mnist(args.data_dir, val_size=5000 if args.val_size is None else args.val_size,
                                  train_subset=train_subset, test_subset=args.test_subset or 0)
    return load_fortunes(args.data_dir, train_chars=train_subset)


def main(argv=None) -> int:
    fm, ft = PRESETS["fmnist"], PRESETS["fortunes"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="fmnist",
                   help="fmnist: CNN on Fashion-MNIST (default); fortunes: character LSTM on Debian's fortunes")
    p.add_argument("--quick", action="store_true",
                   help="fewer epochs (fmnist) or also less text (fortunes), one lr per method fixed "
                        "from the full run")
    p.add_argument("--models", help="comma list of cnn, resnet (ResNet-8), resnet20, ... (fmnist; default "
                                    "cnn) or lstm (width 128), lstm200, ... (fortunes; default lstm)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ",".join(OPTIMIZERS))
    p.add_argument("--batch-sizes", help=f"default {fm['batch_sizes']} (fmnist), {ft['batch_sizes']} (fortunes: "
                                         "parallel text streams)")
    p.add_argument("--epochs", type=int,
                   help=f"epochs of every run (fmnist: full {fm['full']['epochs']}, quick {fm['quick']['epochs']}; "
                        f"fortunes: full {ft['full']['epochs']}, quick {ft['quick']['epochs']})")
    p.add_argument("--train-subset", type=int,
                   help=f"fmnist: train on this many of the 55k non-validation images (full and quick "
                        f"{fm['full']['train_subset']}); fortunes: on whole training fortunes up to this "
                        f"many characters of the ~2.3M (full {ft['full']['train_subset']}, quick "
                        f"{ft['quick']['train_subset']}); 0 = all")
    p.add_argument("--val-size", type=int, help="fmnist: images held out of the 60k for lr selection (default 5000)")
    p.add_argument("--test-subset", type=int, help="fmnist: first N test images only (default 0 = all 10k)")
    p.add_argument("--bptt", type=int, help=f"fortunes: characters per truncated-BPTT window (default {DEFAULT_BPTT})")
    p.add_argument("--seeds", help="seeds run at each chosen lr; the grid runs use the first (default 0)")
    p.add_argument("--lr", action="append", metavar="OPT@BATCH=LR,...",
                   help="override a grid (or, with --quick, the fixed lr), e.g. sngm@4096=0.1,0.3,1")
    p.add_argument("--extend-edge", type=int, default=1,
                   help="while the chosen lr is at the edge of its grid, add the next lr (x~3) beyond "
                        "it, at most this many times per method (full run only)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: on 2 cores shared with other busy "
                        "processes, 2 threads ran runs up to 10x slower; on an idle 2-core machine 2 "
                        "threads are ~1.4x faster)")
    p.add_argument("--backend", default="auto", help="SNGM backend (auto picks the fastest available)")
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist) "
                                      "or fortunes folder (default /usr/share/games/fortunes)")
    p.add_argument("--out", help="output prefix (default large_batch_study/results/train_full, train_quick, "
                                 "train_text_full or train_text_quick)")
    p.add_argument("--resume", action="store_true", help="keep finished runs found in <out>.json")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the table, <out>.md and the plots from <out>.json")
    args = p.parse_args(argv)
    if args.report_only:
        out = args.out or default_out(args.task, args.quick)
        result = json.load(open(out + ".json"))
        report(result, out, plots=not args.no_plots)
        return 0
    if args.task == "fortunes" and (args.val_size is not None or args.test_subset is not None):
        p.error("--val-size and --test-subset are for --task fmnist (fortunes splits 90/5/5 by fortune)")
    if args.task == "fmnist" and args.bptt is not None:
        p.error("--bptt is for --task fortunes")

    task = ImageTask() if args.task == "fmnist" else TextTask(DEFAULT_BPTT if args.bptt is None else args.bptt)
    preset = PRESETS[args.task]["quick" if args.quick else "full"]
    models = (args.models or preset["models"]).split(",")
    for m in models:
        if not m.startswith(task.model_prefixes):
            p.error(f"model {m!r} is not one of --task {args.task}'s ({', '.join(task.model_prefixes)}...)")
    opts = args.optimizers.split(",")
    for o in opts:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}")
    bss = [int(b) for b in (args.batch_sizes or PRESETS[args.task]["batch_sizes"]).split(",")]
    epochs = args.epochs or preset["epochs"]
    subset = preset["train_subset"] if args.train_subset is None else args.train_subset
    seeds = [int(s) for s in (args.seeds or preset["seeds"]).split(",")]
    overrides = parse_lr_override(args.lr)
    out = args.out or default_out(args.task, args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.task == "fortunes":
            # LSTM runs at too large an lr saturate their gates and fill the float math with
            # denormals: such epochs ran 2.5x slower, with the same losses when flushed to zero
            torch.set_flush_denormal(True)
    data = load_data(args.task, args, subset)
    data.train, data.val, data.test = data.train.to(device), data.val.to(device), data.test.to(device)

    # lrs to run per (model, opt, bs): a grid (full) or one fixed lr (quick)
    plan = {}
    for m in models:
        for bs in bss:
            for o in opts:
                if args.quick:
                    if (o, bs) in overrides:
                        lrs, src = overrides[(o, bs)][:1], "--lr"
                    elif (m, o, bs) in FIXED_LRS:
                        lrs, src = [FIXED_LRS[(m, o, bs)]], "full run's choice"
                    else:
                        g = grid_for(args.task, o, bs, {})
                        lrs, src = [g[len(g) // 2]], "middle of the grid (no full-run choice)"
                else:
                    lrs, src = grid_for(args.task, o, bs, overrides), "grid"
                plan[(m, o, bs)] = (lrs, src)

    settings = {
        "mode": "quick" if args.quick else "full", **task.settings(), "models": models, "optimizers": opts,
        "batch_sizes": bss, "epochs": epochs, "seeds": seeds, "grid_seed": seeds[0],
        "momentum": args.momentum, "weight_decay": args.weight_decay,
        "schedule": "cosine per epoch, lr_m = lr_0 * 0.5 * (1 + cos(pi * m / epochs)), m = 0..epochs-1; no warm-up",
        "lr_selection": task.selection_rule,
        "extend_edge": 0 if args.quick else args.extend_edge,
        "lrs": {f"{m}/{o}/{bs}": {"lrs": v[0], "source": v[1]} for (m, o, bs), v in plan.items()},
        "adam": "torch.optim.Adam, betas (0.9, 0.999), L2 weight decay",
        "lars": "large_batch_study/train/lars.py: per tensor, w -= lr * ||w|| * m / ||m||, m = 0.9 m + g + wd w",
        # resnet20 -> resnetN, lstm200 -> lstmN
        "models_desc": {m: MODELS.get(m) or MODELS.get(m.rstrip("0123456789") + "N", m) for m in models},
    }
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "flush_denormal": device.type == "cpu" and args.task == "fortunes",
           "sngm_backend": sngm_backend_name(device, args.backend)}
    result = {"schema": SCHEMA, "command": "python large_batch_study/train_large_batch.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv)),
              "settings": settings, "environment": env, "data": data.info, "runs": [], "selection": [], "table": []}
    done = {}
    if args.resume and os.path.exists(out + ".json"):
        old = json.load(open(out + ".json"))
        same_data = (old["settings"].get("task", "fmnist") == args.task
                     and old.get("data", {}).get("n_train") == data.info["n_train"])
        for r in old.get("runs", []):
            if same_data and r.get("epochs") == epochs and all(r.get(k) == v for k, v in task.run_settings().items()):
                done[(r["model"], r["optimizer"], r["batch_size"], r["lr"], r["seed"])] = r

    print(f"sngm-ext large-batch miniature ({settings['mode']}): {task.describe(data.info)}; "
          f"models {models}, batch sizes {bss}, "
          f"{epochs} epochs, seeds {seeds}, device {device} ({env['threads']} threads), "
          f"SNGM backend {env['sngm_backend']}", flush=True)
    for (m, o, bs), (lrs, src) in plan.items():
        print(f"  lrs {m:6s} B={bs:<5d} {LABELS[o]:18s} {lrs}  ({src})")
    n_planned = sum(len(v[0]) for v in plan.values()) + len(plan) * (len(seeds) - 1)
    t_start = time.perf_counter()
    counter = [0]

    def run(m, o, bs, lr, seed, phase):
        counter[0] += 1
        key = (m, o, bs, lr, seed)
        head = f"[{counter[0]:3d}/{n_planned}] {m} B={bs} {LABELS[o]} lr={lr:g} seed={seed}"
        if key in done:
            r = dict(done[key], phase=phase)
            print(f"{head}: kept from {out}.json", flush=True)
        else:
            print(head, flush=True)
            r = train_run(task, data, m, o, bs, lr, seed, epochs, args.momentum, args.weight_decay, device,
                          args.backend, progress=lambda s: print("    " + s, flush=True))
            r["phase"] = phase
        result["runs"].append(r)
        el = time.perf_counter() - t_start
        left = n_planned - counter[0]
        eta = el / counter[0] * left if counter[0] else 0
        f = r["final"]
        print(f"    -> {task.run_summary(f)}"
              f"{'  DIVERGED' if r['diverged'] else ''}  ({r['time_s']:.0f}s; elapsed {fmt_time(el)}, "
              f"~{fmt_time(eta)} left)", flush=True)
        write_json(out + ".json", result)
        return r

    for m in models:
        for bs in bss:
            for o in opts:
                lrs, src = plan[(m, o, bs)]
                for lr in lrs:
                    run(m, o, bs, lr, seeds[0], "grid")
                sel = select_lr(task, result["runs"], m, o, bs, seeds[0])
                ext = 0
                while not args.quick and sel["at_grid_edge"] and ext < args.extend_edge:
                    g = sel["grid"]
                    lo, hi = g[0], g[-1]
                    ratio = (g[1] / g[0]) if len(g) > 1 else 3.0
                    new = hi * ratio if sel["chosen_lr"] == hi else lo / ratio
                    new = float(f"{new:.3g}")
                    print(f"    chosen lr {sel['chosen_lr']:g} is at the edge of {g}: adding lr {new:g}", flush=True)
                    n_planned += 1
                    run(m, o, bs, new, seeds[0], "grid")
                    sel = select_lr(task, result["runs"], m, o, bs, seeds[0])
                    ext += 1
                sel["extended"] = ext
                sel["lr_source"] = src
                result["selection"].append(sel)
                for seed in seeds[1:]:
                    run(m, o, bs, sel["chosen_lr"], seed, "seed")
                result["table"] = summarize(task, result["runs"], result["selection"])
                write_json(out + ".json", result)

    result["wall_time_s"] = time.perf_counter() - t_start
    write_json(out + ".json", result)
    report(result, out, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
