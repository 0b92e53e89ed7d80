"""Markdown tables for ``mtp analyze`` reports."""

from __future__ import annotations


def _depth_index(n_layers: int, fraction: float) -> int:
    return round(fraction * (n_layers - 1))


def accuracy_table(report: dict) -> str:
    """One row per model x corpus x k x top-p: accuracy of the k-step marginal against x_{t+k}."""
    lines = ["| model | data | positions | k | top-p | top-1 | top-5 | candidates mean / median / p95 | capped | mass |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lead = f"| {r['model']} | {r['data']} | {r['positions']}"
        lines.append(f"{lead} | 1 (NTP) | – | {r['ntp']['top1']:.3f} | {r['ntp']['top5']:.3f} | – | – | 1 |")
        for m in r["marginal"]:
            c = m["candidates"]
            lines.append(f"{lead} | {m['k']} | {m['top_p']:g} | {m['top1']:.3f} | {m['top5']:.3f} | "
                         f"{c['mean']:.1f} / {c['median']:.0f} / {c['p95']:.0f} | {m['capped_share']:.0%} | "
                         f"{m['mass']:.3f} |")
    return "\n".join(lines)


def lens_table(report: dict) -> str:
    """Logit lens summary: KL(p_layer || p_final) and top-1 agreement at a quarter, half and 3/4 depth."""
    rows = [r for r in report["results"] if "lens" in r]
    if not rows:
        return ""
    lines = ["| model | data | layers | KL @25% / 50% / 75% depth | top-1 agreement @25% / 50% / 75% |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        kl, agree = r["lens"]["kl"], r["lens"]["top1_agreement"]
        idx = [_depth_index(len(kl), f) for f in (0.25, 0.5, 0.75)]
        lines.append(f"| {r['model']} | {r['data']} | {len(kl) - 1} | "
                     f"{' / '.join(f'{kl[i]:.2f}' for i in idx)} | {' / '.join(f'{agree[i]:.2f}' for i in idx)} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    cfg = report["config"]
    head = (f"Marginalization MTP (max {cfg['max_candidates']} candidate paths per position; "
            f"context >= {cfg['context']} tokens)")
    parts = [head, "", accuracy_table(report)]
    lens = lens_table(report)
    if lens:
        parts += ["", "Logit lens (layer 0 = embeddings)", "", lens]
    return "\n".join(parts)
