"""PNG plots for ``mtp analyze`` reports (Mehra et al. Figs. 2-4)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtp.config import ANALYZE_PLOTS
from mtp.io import save_figure  # noqa: E402

_STYLES = ["-", "--", ":", "-."]


def _grid(report: dict):
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    data = list(dict.fromkeys(r["data"] for r in report["results"]))
    cell = {(r["model"], r["data"]): r for r in report["results"]}
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    return models, data, cell, colors


def _short(name: str) -> str:
    return Path(name).name if "/" in name else name


def plot_accuracy(report: dict, path: Path) -> None:
    """Top-1 / top-5 accuracy of the k-step marginal vs k, per model and corpus; one line style per top-p."""
    models, data, cell, colors = _grid(report)
    top_ps = report["config"]["top_p"]
    fig, axes = plt.subplots(2, len(data), figsize=(4 * len(data), 6.5), squeeze=False, sharey="row")
    for j, d in enumerate(data):
        for i, metric in enumerate(["top1", "top5"]):
            ax = axes[i, j]
            for m in models:
                r = cell.get((m, d))
                if r is None:
                    continue
                for s, p in enumerate(top_ps):
                    ks = [1] + [x["k"] for x in r["marginal"] if x["top_p"] == p]
                    ys = [r["ntp"][metric]] + [x[metric] for x in r["marginal"] if x["top_p"] == p]
                    ax.plot(ks, ys, _STYLES[s % 4], marker="o", color=colors[m],
                            label=f"{_short(m)} (top-p {p:g})")
            ax.set_title(f"{d}: {metric.replace('top', 'top-')}")
            ax.set_xlabel("k (predicting x_{t+k})")
            ax.set_xticks(range(1, report["config"]["k"] + 1))
            ax.grid(alpha=0.3)
    _finish(fig, axes, ("accuracy", "accuracy"), path)


def _finish(fig, axes, ylabels: tuple[str, str], path: Path) -> None:
    """Row labels, the legend in the top-right panel, then the figure written (atomically)."""
    for row, label in enumerate(ylabels):
        axes[row, 0].set_ylabel(label)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lens(report: dict, path: Path) -> None:
    """KL(p_layer || p_final) and top-1 agreement per layer (relative depth), per model and corpus."""
    models, data, cell, colors = _grid(report)
    if not any("lens" in r for r in report["results"]):
        return
    fig, axes = plt.subplots(2, len(data), figsize=(4 * len(data), 6.5), squeeze=False, sharey="row")
    for j, d in enumerate(data):
        for m in models:
            r = cell.get((m, d))
            if r is None or "lens" not in r:
                continue
            kl, agree = r["lens"]["kl"], r["lens"]["top1_agreement"]
            x = np.arange(len(kl)) / (len(kl) - 1)
            axes[0, j].plot(x, kl, color=colors[m], label=f"{_short(m)} ({len(kl) - 1} layers)")
            axes[1, j].plot(x, agree, color=colors[m])
        axes[0, j].set_title(f"{d}: KL(p_layer || p_final)")
        axes[1, j].set_title(f"{d}: top-1 agreement with final")
        for ax in axes[:, j]:
            ax.set_xlabel("layer / number of layers (0 = embeddings)")
            ax.grid(alpha=0.3)
    _finish(fig, axes, ("KL (nats)", "share of positions"), path)


def plot_entropy(report: dict, path: Path) -> None:
    """Entropy of the next-token distribution along one example sequence per model and corpus."""
    models, data, cell, colors = _grid(report)
    fig, axes = plt.subplots(len(models), len(data), figsize=(4.5 * len(data), 2.4 * len(models)),
                             squeeze=False, sharey=True)
    for i, m in enumerate(models):
        for j, d in enumerate(data):
            ax = axes[i, j]
            r = cell.get((m, d))
            if r is not None:
                ax.plot(r["entropy"]["entropy"], color=colors[m], lw=0.8)
            ax.set_title(f"{_short(m)} x {d}", fontsize=9)
            ax.set_xlabel("position")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("entropy (nats)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_candidates(report: dict, path: Path) -> None:
    """Histogram of the number of candidate paths per position, per k; one line style per top-p."""
    models, data, cell, colors = _grid(report)
    ks = sorted({int(k) for r in report["results"] for k in r["candidate_counts"]})
    if not ks:
        return
    cap = report["config"]["max_candidates"]
    bins = np.unique(np.geomspace(1, cap + 1, 25).astype(int))
    fig, axes = plt.subplots(len(ks), len(data), figsize=(4 * len(data), 3.2 * len(ks)), squeeze=False)
    for i, k in enumerate(ks):
        for j, d in enumerate(data):
            ax = axes[i, j]
            for m in models:
                r = cell.get((m, d))
                if r is None:
                    continue
                for s, (p, counts) in enumerate(r["candidate_counts"][str(k)].items()):
                    ax.hist(counts, bins=bins, histtype="step", linestyle=_STYLES[s % 4], color=colors[m],
                            label=f"{_short(m)} (top-p {float(p):g})")
            ax.set_xscale("log")
            ax.set_title(f"{d}: k = {k}")
            ax.set_xlabel(f"candidate paths (cap {cap})")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("positions")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_plots(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in zip(ANALYZE_PLOTS, (plot_accuracy, plot_lens, plot_entropy, plot_candidates)):
        fn(report, out / name)
        if (out / name).exists():
            paths.append(out / name)
    return paths
