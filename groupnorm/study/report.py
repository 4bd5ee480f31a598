"""Tables, figures and the report of a sweep.

* ``results.csv``: one row per run (every seed, every number the run logged).
* ``results.md``: error (%) per norm x per-device batch, mean ± std over seeds, with
  the per-seed values (the paper's Figure 1 as a table).
* ``fig_error_vs_batch.png``: error vs per-device batch per norm, seed error bars.
* ``fig_curves.png``: training and validation error vs epoch (the paper's Figure 4).
* ``ablation.md``: GN group-count ablation (the paper's Table 3), when the sweep has one.
* ``report.md``: what was run, on what, how long, with the tables and figures.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import statistics
from collections import defaultdict

from .config import StudyConfig, batch_independent, run_label
from .atomic import write_atomic

# Wu & He (ECCV 2018), ResNet-50 on ImageNet, val error (%) at 32/16/8/4/2 images per GPU.
PAPER = {"bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}, "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}}

CSV_FIELDS = ["key", "label", "norm", "num_groups", "group_size", "per_device_batch", "total_batch", "ghosts",
              "lr", "seed", "error", "last_val_errs", "final_train_err", "epochs", "steps", "time_s", "diverged"]


def _stats(xs):
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m, s


def _fmt(xs):
    m, s = _stats(xs)
    return f"{m:.2f} ± {s:.2f}" if len(xs) > 1 else f"{m:.2f}"


def rows(pairs):
    """One flat dict per finished run (the CSV rows)."""
    out = []
    for rc, r in pairs:
        if r is None:
            continue
        out.append(dict(key=rc["key"], label=run_label(rc), norm=rc["norm"], num_groups=rc.get("num_groups"),
                        group_size=rc.get("group_size"), per_device_batch=rc["per_device_batch"],
                        total_batch=rc["total_batch"], ghosts=rc["ghosts"], lr=rc["lr_scaled"], seed=rc["seed"],
                        error=round(r["error"], 4), last_val_errs=" ".join(f"{v:.2f}" for v in r["last_val_errs"]),
                        final_train_err=round(r["final_train_err"], 4), epochs=rc["epochs"], steps=r["steps"],
                        time_s=round(r["time_s"], 2), diverged=r["diverged"], role=rc.get("role", "main")))
    return out


def main_grid(rws):
    """{label: {per_device_batch: [errors over seeds]}} of the main-grid runs."""
    g = defaultdict(lambda: defaultdict(list))
    for r in rws:
        if r["role"] == "main":
            g[r["label"]][r["per_device_batch"]].append(r["error"])
    return g


def markdown_table(rws) -> str:
    """Error (%) per norm (rows) x per-device batch (columns), mean ± std over seeds."""
    g = main_grid(rws)
    if not g:
        return "_no finished runs_\n"
    sizes = sorted({n for d in g.values() for n in d}, reverse=True)
    nseeds = max(len(v) for d in g.values() for v in d.values())
    lines = ["| norm \\ per-device batch | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for label, d in g.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(d[n]) if n in d else "" for n in sizes) + " |")
    lines.append("")
    lines.append(f"Validation error (%), median of the last epochs of each run; mean ± std over {nseeds} seed(s).")
    shared = sorted({r["label"] for r in rws if r["role"] == "main" and batch_independent(r["norm"])
                     and len({x["total_batch"] for x in rws if x["label"] == r["label"]}) == 1
                     and len({x["per_device_batch"] for x in rws if x["label"] == r["label"]}) > 1})
    if shared:
        lines.append(f"{', '.join(shared)}: per-sample (or whole-step) statistics, so with the same total batch "
                     "the computation does not depend on the per-device batch; one run per seed fills the row.")
    lines.append("Per-seed values:")
    lines.append("")
    for label, d in g.items():
        lines.append(f"- {label}: " + "; ".join(f"n={n}: " + ", ".join(f"{e:.2f}" for e in d[n])
                                                for n in sizes if n in d))
    return "\n".join(lines) + "\n"


def train_error_table(rws) -> str:
    """Last-epoch training error (%) in train mode (batch statistics), mean over seeds."""
    g = defaultdict(lambda: defaultdict(list))
    for r in rws:
        if r["role"] == "main":
            g[r["label"]][r["per_device_batch"]].append(r["final_train_err"])
    if not g:
        return ""
    sizes = sorted({n for d in g.values() for n in d}, reverse=True)
    lines = ["| training error, last epoch | " + " | ".join(str(n) for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for label, d in g.items():
        lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(d[n]):.2f}" if n in d else "" for n in sizes)
                     + " |")
    return "\n".join(lines) + "\n"


def ablation_table(rws, batch: int) -> str:
    """GN group-count ablation at one per-device batch (paper Table 3), LN/IN included."""
    ent = defaultdict(list)
    for r in rws:
        if r["per_device_batch"] != batch:
            continue
        if r["norm"] == "gn":
            ent[r["label"]].append(r["error"])
        elif r["norm"] in ("ln", "in"):
            ent[r["label"] + (" (G=1)" if r["norm"] == "ln" else " (1 ch/group)")].append(r["error"])
    if len(ent) < 2:
        return ""

    def order(k):
        # G=1 (LN) ... many groups, then channels per group from large to 1 (IN)
        if "G=" in k:
            return (0, int(k.split("G=")[1].rstrip(")")))
        if "ch/group" in k:
            return (1, -int(k.split("(")[1].split()[0]))
        return (2, 0)
    best = min(statistics.mean(v) for v in ent.values())
    lines = [f"| GN grouping (per-device batch {batch}) | error (%) | vs best |", "|---|---:|---:|"]
    for k in sorted(ent, key=order):
        m = statistics.mean(ent[k])
        lines.append(f"| {k} | {_fmt(ent[k])} | {m - best:+.2f} |")
    return "\n".join(lines) + "\n"


def write_csv(path, rws):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS + ["role"], extrasaction="ignore")
    w.writeheader()
    for r in rws:
        w.writerow(r)
    write_atomic(path, buf.getvalue())


def _save_fig(fig, path, data=None):
    # the plotted numbers go into the PNG's text metadata ("groupnorm-data", JSON), so a
    # figure can be checked against the runs that produced it
    meta = {"groupnorm-data": json.dumps(data, sort_keys=True)} if data is not None else None
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90, bbox_inches="tight", metadata=meta)
    os.replace(tmp, path)


def plot_error_vs_batch(path, rws) -> bool:
    """Paper Figure 1: error vs per-device batch per norm, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = main_grid(rws)
    if not g:
        return False
    means = sorted(_stats(v)[0] for d in g.values() for v in d.values())
    med = means[len(means) // 2]
    inliers = [m for m in means if m <= 1.5 * med]
    zoom = len(inliers) < len(means)  # an outlier (e.g. BN at 1 image) would flatten the rest
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11 if zoom else 6, 4), squeeze=False)
    allns = sorted({n for d in g.values() for n in d}, reverse=True)
    for i, ax in enumerate(axes[0]):
        for label, d in g.items():
            ns = sorted(d, reverse=True)
            ms = [_stats(d[n])[0] for n in ns]
            ss = [_stats(d[n])[1] for n in ns]
            line = ax.errorbar(ns, ms, yerr=ss, marker="o", capsize=3, label=label)
            for n in ns:  # every seed as a faint dot
                ax.scatter([n] * len(d[n]), d[n], s=8, alpha=0.35, color=line[0].get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(allns)
        ax.set_xticklabels([str(n) for n in allns])
        ax.set_xlim(max(allns) * 1.3, min(allns) / 1.3)  # large to small, like the paper
        ax.set_xlabel("images per device (per-device batch)")
        ax.set_ylabel("validation error (%)")
        ax.grid(alpha=0.3)
        if i == 1:
            span = max(inliers) - min(inliers)
            ax.set_ylim(min(inliers) - 0.15 * span - 0.5, max(inliers) + 0.15 * span + 0.5)
            ax.set_title("zoom (points above the frame are off-scale)")
        else:
            ax.set_title("Error vs batch size (bars: std over seeds, dots: seeds)")
            ax.legend()
    _save_fig(fig, path, {label: {str(n): v for n, v in d.items()} for label, d in g.items()})
    plt.close(fig)
    return True


def plot_curves(path, pairs) -> bool:
    """Paper Figure 4: train/val error vs epoch at the largest and smallest per-device batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [(rc, r) for rc, r in pairs if r is not None and rc.get("role", "main") == "main" and r["curve"]]
    if not main:
        return False
    sizes = sorted({rc["per_device_batch"] for rc, _ in main})
    show = sorted({sizes[-1], sizes[0]}, reverse=True)
    seed0 = min(rc["seed"] for rc, _ in main)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    colors, plotted = {}, {}
    keys_at_large = {rc["key"] for rc, _ in main if rc["per_device_batch"] == show[0]}
    for rc, r in main:
        if rc["seed"] != seed0 or rc["per_device_batch"] not in show:
            continue
        if rc["per_device_batch"] != show[0] and rc["key"] in keys_at_large:
            continue  # same computation as the solid curve (batch-independent norm)
        label = run_label(rc)
        if label not in colors:
            colors[label] = f"C{len(colors)}"
        style = "-" if rc["per_device_batch"] == show[0] else "--"
        ep = [c["epoch"] for c in r["curve"]]
        plotted[f"{label}, n={rc['per_device_batch']}"] = {k: [c[k] for c in r["curve"]]
                                                           for k in ("epoch", "train_err", "val_err")}
        for ax, k in zip(axes, ("train_err", "val_err")):
            ax.plot(ep, [c[k] for c in r["curve"]], style, color=colors[label], marker=".",
                    label=f"{label}, n={rc['per_device_batch']}")
    for ax, t in zip(axes, ("training error (running, train mode)", "validation error (eval mode)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Training curves, seed {seed0} (solid: n={show[0]}, dashed: n={show[-1]})")
    _save_fig(fig, path, plotted)
    plt.close(fig)
    return True


def observations(rws) -> list[str]:
    """Factual sentences computed from the table (no claims that the numbers do not make)."""
    g = main_grid(rws)
    out = []
    for label, d in g.items():
        ns = sorted(d, reverse=True)
        if len(ns) < 2:
            continue
        lo, hi = ns[0], ns[-1]
        ml, mh = statistics.mean(d[lo]), statistics.mean(d[hi])
        rng = [statistics.mean(d[n]) for n in ns]
        worst_seed_sd = max((_stats(d[n])[1] for n in ns), default=0.0)
        out.append(f"{label}: {ml:.2f}% at {lo} images/device, {mh:.2f}% at {hi} ({mh - ml:+.2f} points); "
                   f"range over batch sizes {min(rng):.2f}-{max(rng):.2f}; largest seed std {worst_seed_sd:.2f}.")
    labels = list(g)
    bn = next((k for k in labels if k == "bn"), None)
    gn = next((k for k in labels if k.startswith("gn")), None)
    if bn and gn:
        common = sorted(set(g[bn]) & set(g[gn]), reverse=True)
        diffs = [f"{n}: {statistics.mean(g[bn][n]) - statistics.mean(g[gn][n]):+.2f}" for n in common]
        out.append(f"BN minus GN error (points; negative = BN better) per images/device: {', '.join(diffs)}.")
        cross = [n for n in common if statistics.mean(g[bn][n]) > statistics.mean(g[gn][n])]
        if cross:
            out.append(f"GN has lower mean error than BN at {', '.join(map(str, cross))} images/device.")
        else:
            out.append("BN has lower or equal mean error than GN at every batch size measured.")
    return out


def write_outputs(cfg: StudyConfig, pairs, *, data, machine, trained, wall_s) -> dict:
    """Write results.csv/.md, ablation.md, the figures and report.md into ``cfg.out``."""
    os.makedirs(cfg.out, exist_ok=True)
    rws = rows(pairs)
    files = {}
    files["csv"] = os.path.join(cfg.out, "results.csv")
    write_csv(files["csv"], rws)
    table = markdown_table(rws)
    files["md"] = os.path.join(cfg.out, "results.md")
    write_atomic(files["md"], table)
    abl = ablation_table(rws, cfg.ablation_batch) if cfg.ablation else ""
    if abl:
        files["ablation"] = os.path.join(cfg.out, "ablation.md")
        write_atomic(files["ablation"], abl)
    f1 = os.path.join(cfg.out, "fig_error_vs_batch.png")
    if plot_error_vs_batch(f1, rws):
        files["fig_error"] = f1
    f4 = os.path.join(cfg.out, "fig_curves.png")
    if plot_curves(f4, pairs):
        files["fig_curves"] = f4
    files["report"] = os.path.join(cfg.out, "report.md")
    write_atomic(files["report"], report_text(cfg, pairs, rws, table, abl, data, machine, trained, wall_s, files))
    return files


def _saved(cfg, key, default):
    """A field the sweep saved in study.json (also available to --report-only)."""
    try:
        with open(os.path.join(cfg.out, "study.json")) as f:
            return json.load(f)[key]
    except (OSError, KeyError, ValueError):
        return default


def report_text(cfg, pairs, rws, table, abl, data, machine, trained, wall_s, files) -> str:
    """The Markdown report: what was run, on what, how long, results, departures from the paper."""
    run_time = sum({r["key"]: r["time_s"] for r in rws}.values())  # each distinct run once
    any_rc = pairs[0][0] if pairs else {}
    n_params = next((r["num_params"] for _, r in pairs if r), None)
    model = (f"plain VGG-style net, stages {cfg.widths} x {cfg.convs_per_stage} conv3x3-norm-ReLU"
             if cfg.model == "plain" else f"CIFAR ResNet-{cfg.depth}, width x{cfg.width}")
    T = "fixed at " + str(cfg.total_batch) if cfg.total_batch else f"{cfg.devices} devices x per-device batch"
    diverged = [r for r in rws if r["diverged"]]
    L = [f"# GroupNorm batch-size study ({cfg.preset or 'custom'})", "",
         f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by groupnorm "
         f"{machine.get('groupnorm')}.", "",
         "## What was run", "",
         f"- Command: `{_saved(cfg, 'command', '?')}`",
         f"- Data: {data.describe() if data is not None else _saved(cfg, 'data', cfg.data)}",
         f"- Model: {model}" + (f", {n_params:,} parameters" if n_params else ""),
         f"- Norms: {', '.join(dict.fromkeys(r['label'] for r in rws))}",
         f"- Per-device batch sizes: {cfg.batch_sizes}; seeds: {cfg.seeds}",
         f"- Samples per optimizer step: {T}; each step's samples are split into devices of the "
         "per-device batch (ghost batches) that batch-statistics norms normalize separately.",
         f"- Learning rate: {cfg.lr} x total/{cfg.base_batch} (linear scaling), SGD momentum {cfg.momentum}, "
         f"weight decay {cfg.weight_decay}{' (also on gamma/beta)' if cfg.wd_norm else ' (not on gamma/beta)'}, "
         f"{cfg.warmup_epochs} warmup epoch(s) then cosine, {cfg.epochs} epochs at every batch size.",
         f"- Result per run: median validation error of the last {cfg.median_last} epoch(s).",
         "", "## On what, how long", "",
         f"- Machine: {machine.get('cpu')}, {machine.get('cores')} cores, {machine.get('threads')} torch threads, "
         f"{machine.get('processes')} process(es), GPU: {machine.get('gpu') or 'none'}",
         f"- torch {machine.get('torch')}, Python {machine.get('python')}, {machine.get('platform')}",
         f"- {len({r['key'] for r in rws})} distinct runs ({len(rws)} table cells); training time summed over runs {run_time:.0f} s"
         + (f"; this invocation: {trained} run(s) trained, wall time {wall_s:.0f} s" if wall_s is not None else ""),
         ]
    if any_rc:
        L.append(f"- Steps per run: {pairs[0][1]['steps'] if pairs[0][1] else '?'}")
    L += ["", "## Results: error vs per-device batch (paper Figure 1)", "", table]
    if "fig_error" in files:
        L += [f"![error vs batch]({os.path.basename(files['fig_error'])})", ""]
    L += ["Observations (computed from the table):", ""] + [f"- {o}" for o in observations(rws)] + [""]
    if diverged:
        L += [f"- {len(diverged)} run(s) diverged (non-finite loss) and count as 100% error: "
              + ", ".join(f"{r['label']} n={r['per_device_batch']} seed {r['seed']}" for r in diverged), ""]
    L += ["Training error of the last epoch, measured in train mode during training (BN with the batch "
          "statistics of each device); a large gap to the validation error means the running averages used "
          "at evaluation do not match the statistics the network was trained with:", "", train_error_table(rws)]
    L += ["For reference, the paper (ResNet-50, ImageNet, 8 GPUs) at 32/16/8/4/2 images per GPU: "
          "BN " + " / ".join(str(v) for v in PAPER["bn"].values()) + ", GN "
          + " / ".join(str(v) for v in PAPER["gn"].values()) + ".", ""]
    if "fig_curves" in files:
        L += ["## Training curves (paper Figure 4)", "", f"![curves]({os.path.basename(files['fig_curves'])})", ""]
    if abl:
        L += ["## Group-count ablation (paper Table 3)", "", abl,
              "Paper (ResNet-50, 32 images/GPU): G=32 best; G=1 (LN) +1.2 and 1 channel/group (IN) +4.3 "
              "points worse than the best.", ""]
    L += ["## Departures from the paper", "",
          "- Model, data and length are far smaller than ResNet-50 on ImageNet for 100 epochs; the size of the "
          "BN penalty at small batches depends on depth and training length (see docs/study.md).",
          "- Devices are simulated with ghost batches in one process (statistically the same split as real "
          "devices; tested against 2 gloo processes).",
          "- With 1 image per device, BN statistics are those of a single image (per-channel over its pixels, "
          "like Instance Norm in training) while evaluation uses running averages; a 1x1 map would give beta "
          "(no error is raised).",
          "- Learning-rate schedule: linear warmup then cosine, not the paper's step schedule.", "",
          "## Files", "", "- results.csv (one row per run), results.md, "
          + ("ablation.md, " if abl else "") + "fig_error_vs_batch.png, fig_curves.png, study.json, "
          "runs/<key>/{config,result}.json", ""]
    return "\n".join(L)
