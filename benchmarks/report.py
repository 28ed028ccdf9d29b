"""How bench_step.py's results are written: the table on stdout, the Markdown, the JSON and the
PNG (``plot``: its title is ``fig.suptitle`` at the end), each target's line, and the files under
--out (``save_report``). Reads the report dict bench_step.py builds; measures nothing."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence


def target_line(x: Dict[str, object]) -> str:
    pct = str(x["what"]).startswith("share")
    fmt = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.2f}x")
    return (f"{x['set']} {x['variant']}: {x['what']} {fmt(x['value'])} "
            f"(target {'<=' if x['at_most'] else '>='} {fmt(x['target'])}): "
            f"{'met' if x['met'] else 'MISSED'}")


def target_lines(targets: Sequence[Dict[str, object]]) -> List[str]:
    return [target_line(x) for x in targets]


def phases_line(phases: Dict[str, Dict[str, object]]) -> str:
    parts = []
    for name, st in phases.items():
        gb = f" ({st['gbps']:.1f} GB/s)" if st.get("gbps") else ""
        parts.append(f"{name} {_ms(st['median_s'])}{gb}")
    return "phases alone, median ms: " + "; ".join(parts)


def python_cost_lines(pc: Dict[str, object]) -> List[str]:
    """--python-cost: a heading and one line per variant (median and quartiles in microseconds)."""
    out = [f"Python cost per step, kernels stubbed ({pc['set']}: {pc['n_tensors']} tensors, "
           f"{pc['device']}; median of {pc['variants'][0]['n']} steps, host time):"]
    for r in pc["variants"]:
        out.append(f"{r['variant']}: {1e6 * r['median_s']:.1f} us "
                   f"(p25-p75 {1e6 * r['p25_s']:.1f}-{1e6 * r['p75_s']:.1f}), "
                   f"{r['ratio_vs_sgd_fused']:.2f}x fused SGD's; {r['impl']}")
    return out


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def set_title(res: Dict[str, object]) -> str:
    copy = f"; copy {res['copy']['gbps']:.1f} GB/s in the same rounds" if res.get("copy") else ""
    return (f"{res['name']}: {res['note']}, {res['numel']:,} params in {res['n_tensors']} tensors, "
            f"{res['dtype']}{copy}")


def table_rows(res: Dict[str, object], cuda: bool) -> List[List[str]]:
    rows = []
    for r in res["variants"]:
        ratio = r["ratio_vs_best_sgd"]
        row = [
            r["variant"],
            _ms(r["median_s"]),
            f"{_ms(r['p25_s'])}-{_ms(r['p75_s'])}",
            _ms(r["min_s"]),
            "-" if ratio is None else f"{ratio:.2f}x",
            f"{r['gbps']:.1f}",
            "-" if r["frac_copy"] is None else f"{100 * r['frac_copy']:.0f}%",
            _mb(r["extra_bytes"]),
        ]
        if cuda:
            row.append(_mb(r["peak_step_bytes"]))
        rows.append(row)
    return rows


HEADERS = ["variant", "median ms", "p25-p75 ms", "min ms", "vs best SGD", "GB/s", "of copy", "extra MiB"]


def format_table(res, cuda: bool) -> str:
    headers = HEADERS + (["step peak MiB"] if cuda else [])
    rows = table_rows(res, cuda)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = [set_title(res) + f"  [best SGD: {res['best_sgd']}; {res['rounds']} rounds]"]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(fmt(headers))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows]
    for name, why in res["skipped"].items():
        lines.append(f"  ({name}: {why})")
    if res.get("phases"):
        lines.append(phases_line(res["phases"]))
    return "\n".join(lines)


def _load(m: Dict[str, object]) -> str:
    a, b = m.get("load_average"), m.get("load_average_end")
    if not a or m.get("device") != "cpu":
        return ""
    end = f" / {b[0]:.1f}" if b else ""
    return f"; load average {a[0]:.1f}{end} (start / end) on {m['cpu_count']} CPUs"


def format_markdown(report: Dict[str, object], json_name: str) -> str:
    m = report["machine"]
    cuda = m["device"] == "cuda"
    out = [
        f"**{m['device_name']}** ({m['device']}, {m['torch_threads']} torch "
        f"thread{'s' if m['torch_threads'] != 1 else ''}), "
        f"torch {m['torch']}, triton {m['triton']}, sngm_ext {m['sngm_ext']}, "
        f"commit `{(m['git_commit'] or '?')[:10]}`, {m['date']}; copy bandwidth up front "
        f"{report['copy']['gbps']:.1f} GB/s{_load(m)}. Data: [{json_name}]({json_name}).",
        "",
    ]
    headers = HEADERS + (["step peak MiB"] if cuda else [])
    for res in report["sets"]:
        out.append(f"*{set_title(res)}*")
        out.append("")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|")
        for r in table_rows(res, cuda):
            out.append("| " + " | ".join(r) + " |")
        for name, why in res["skipped"].items():
            out.append(f"\n({name} left out: {why})")
        if res.get("phases"):
            out.append("\n" + phases_line(res["phases"]))
        out.append("")
    if report.get("python_cost"):
        head, *rows = python_cost_lines(report["python_cost"])
        out += [f"**{head}**", ""] + [f"- {r}" for r in rows] + [""]
    elif "python-cost" in report.get("errors", {}):
        out += [f"**Python cost not measured**: {report['errors']['python-cost']}", ""]
    if report.get("targets"):
        out.append("**Targets**")
        out.append("")
        out += [f"- {line}" for line in target_lines(report["targets"])]
        out.append("")
    if report.get("unavailable"):
        out.append("Not measured here: " + "; ".join(
            f"{k} ({v})" for k, v in report["unavailable"].items()))
        out.append("")
    if report.get("budget"):
        out.append(budget_line(report))
        out.append("")
    return "\n".join(out)


def budget_line(report: Dict[str, object]) -> str:
    """One line on the --budget-s run: how far it got and which sets it skipped."""
    b = report["budget"]
    done = len(report["sets"])
    state = "finished" if b["finished"] else "in progress (rewritten after each set)"
    line = (f"Time budget {b['budget_s']:g} s (--budget-s), {state}: {done} of "
            f"{len(b['sets_planned'])} sets measured in {b['elapsed_s']:.1f} s")
    if b["skipped_sets"]:
        line += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in b["skipped_sets"].items())
    if report.get("errors"):
        line += "; failed: " + "; ".join(f"{k} ({v})" for k, v in report["errors"].items())
    return line + "."


def plot(report: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["sets"]
    models = [s for s in sets if s["kind"] == "model"]
    counts = [s for s in sets if s["kind"] == "count-sweep"]
    sizes = [s for s in sets if s["kind"] == "size-sweep"]
    panels = [p for p in (models, counts, sizes) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    axes = axes[0]
    names: List[str] = []
    for s in sets:
        for r in s["variants"]:
            if r["variant"] not in names:
                names.append(r["variant"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    ai = 0
    if models:
        ax = axes[ai]
        ai += 1
        width = 0.8 / max(len(names), 1)
        for j, n in enumerate(names):
            xs, ys = [], []
            for i, s in enumerate(models):
                for r in s["variants"]:
                    if r["variant"] == n and r["ratio_vs_best_sgd"] is not None:
                        xs.append(i + (j - (len(names) - 1) / 2) * width)
                        ys.append(r["ratio_vs_best_sgd"])
            ax.bar(xs, ys, width, label=n, color=colors[n])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{s['name']}\n{s['numel'] / 1e6:,.1f}M, {s['n_tensors']} t" for s in models])
        ax.set_yscale("log")
        ax.set_ylabel("step time / best torch SGD (lower is better)")
        ax.set_title("model-shaped parameter sets")
        ax.legend(fontsize=7)
    for group, xkey, xlabel, title in (
        (counts, "n_tensors", "number of tensors", "fixed total size"),
        (sizes, "numel", "total params", "fixed tensor count"),
    ):
        if not group:
            continue
        ax = axes[ai]
        ai += 1
        for n in names:
            pts = [(s[xkey], r["median_s"] * 1e3) for s in group for r in s["variants"]
                   if r["variant"] == n]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=n, color=colors[n])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median step time (ms)")
        sub = (f"{group[0]['numel']:,} params" if xkey == "n_tensors"
               else f"{group[0]['n_tensors']} tensors")
        ax.set_title(f"{title} ({sub})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    # two lines, wrapped to the figure's width: one panel (a quick run) is narrower than the title
    fig.suptitle(f"SNGM step vs torch.optim.SGD on {m['device_name']} ({m['torch_threads']} threads)\n"
                 f"torch {m['torch']}, triton {m['triton']}, {m['date'][:10]}", fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_report(report: Dict[str, object], out: str, base: str, kind: str,
                with_plot: bool = True) -> List[str]:
    """Writes ``base``.json / .md (/ .png) and latest_<kind>.* beside them; the paths written.

    Each file is replaced atomically (a run killed while writing leaves the previous version), and
    the numbers are all written before the plot is drawn.
    """
    os.makedirs(out, exist_ok=True)
    json_name = os.path.basename(base) + ".json"
    text = {".json": json.dumps(report, indent=1), ".md": format_markdown(report, json_name)}
    written = []
    for ext, body in text.items():
        _write_atomic(base + ext, body)
        _write_atomic(os.path.join(out, f"latest_{kind}{ext}"), body)
        written.append(base + ext)
    if with_plot:
        try:
            plot(report, base + ".png")
            written.append(base + ".png")
            tmp = os.path.join(out, f"latest_{kind}.png.tmp{os.getpid()}")
            shutil.copyfile(base + ".png", tmp)
            os.replace(tmp, os.path.join(out, f"latest_{kind}.png"))
        except Exception as e:  # a plot problem must not lose the numbers
            print(f"(plot failed: {type(e).__name__}: {e})", file=sys.stderr)
    return written
