"""``mtp eval``: per-head accuracy on held-out text beside the backbone's own k-step marginalization.

Head k predicts x_{t+1+k}; marginalization with d = k + 1 steps predicts the same token from the same
position, so the two stand side by side on identical positions (Mehra et al., arXiv 2502.09419, §4).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mtp.analysis.marginal import CachedEvaluator, marginalize
from mtp.analysis.run import load_corpora
from mtp.backbones import backbone_config, check_context, check_vocab, load_backbone, resolve_backbone
from mtp.config import CompareConfig, EvalConfig, short_repr
from mtp.data import Corpus, make_windows
from mtp.errors import UserError
from mtp.heads_format import ACCURACY, resolve_heads, write_accuracy
from mtp.io import check_new_output, read_json, save_figure
from mtp.model.mtp import MTPModel
from mtp.training.losses import chunked_head_loss, head_targets, IGNORE

MAX_MARGINAL_STEPS = 3
RANKS = 10  # per-rank accuracies of each head's top tokens, for sizing decoding trees


@torch.inference_mode()
def head_predictions(model: MTPModel, input_ids: torch.Tensor, positions: torch.Tensor, top: int = 10) -> torch.Tensor:
    """Top-``top`` tokens of every head (k = 0 .. n) at ``positions``: (K, P, top)."""
    ids = input_ids.to(model.backbone.device)[None]
    final, states = model.trunk(ids)
    pos = positions.to(ids.device)
    rows = [model.logits(final[0, pos], normed=True)]
    rows += [to_logits(h[0, pos]) for h, to_logits in model.head_outputs(states, ids)]
    return torch.stack(rows).topk(top, dim=-1).indices  # (K, P, top)


def chain_acceptance(hits: torch.Tensor) -> dict:
    """hits (n, P) bool: head / draft step k's top-1 was the true token at each scored position. A greedy chain of
    n drafts keeps its first k when steps 1..k are all right (each step's input was the truth, which the draft
    equals while it is right): ``accepted[k-1]`` = P(first k accepted), ``tau`` = 1 + their sum, the expected
    tokens per target forward of a chain verify (the verify's own token included)."""
    if hits.numel() == 0:
        return {"accepted": [0.0] * hits.shape[0], "tau": 1.0}
    prefix = hits.long().cumprod(0).float().mean(-1)  # (n,)
    return {"accepted": [round(float(x), 5) for x in prefix], "tau": round(1 + float(prefix.sum()), 4)}


@torch.inference_mode()
def heldout_scores(model: MTPModel, blocks: torch.Tensor, masks: torch.Tensor | None, states: list, batch: int = 8,
                   chunk_tokens: int = 4096) -> dict:
    """Held-out figures of the heads on training-style blocks (training's periodic evaluation): per head / draft
    step k the mean cross-entropy and top-1 over the positions whose target is scored, and the chain acceptance
    over the positions where every step's target is (:func:`chain_acceptance`). ``states``: the backbone's
    tapped states of every block ([(N, T, H)], computed once)."""
    n = model.n_heads
    loss_sum, hit_sum, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(n)
    chains = []
    was_training = model.training
    model.eval()
    for a in range(0, blocks.shape[0], batch):
        ids = blocks[a:a + batch].to(states[0].device)
        mask = masks[a:a + batch].to(ids.device) if masks is not None else None
        hits, valid = [], []
        for k, (hidden, to_logits) in enumerate(model.head_outputs([s[a:a + batch] for s in states], ids), 1):
            targets = head_targets(ids, k, mask)
            if model.autoregressive:  # scored over the draft vocabulary, as trained and as drafted
                small = model.eagle.to_draft(targets)
                targets = torch.where(small >= 0, targets, IGNORE)
                loss = chunked_head_loss(model.eagle.draft_logits, hidden, small, 0.0, chunk_tokens, backward=False)
                top = model.eagle.draft_ids[model.eagle.draft_logits(hidden).argmax(-1)]
            else:
                loss = chunked_head_loss(to_logits, hidden, targets, 0.0, chunk_tokens, backward=False)
                top = to_logits(hidden).argmax(-1)
            ok = targets != IGNORE
            loss_sum[k - 1] += float(loss) * int(ok.sum())
            hit_sum[k - 1] += float((top == targets)[ok].sum())
            count[k - 1] += int(ok.sum())
            hits.append(top == targets)
            valid.append(head_targets(ids, k, mask) != IGNORE)  # the true token, in the draft vocabulary or not
        every = torch.stack(valid).all(0)  # (B, T): every step's target is a scored token
        chains.append(torch.stack(hits)[:, every])  # (n, P)
    model.train(was_training)
    count = count.clamp_min(1)
    return {"loss": [round(float(x), 5) for x in loss_sum / count], "top1": [round(float(x), 5) for x in hit_sum / count],
            **chain_acceptance(torch.cat(chains, 1)), "positions": int(count[0])}


def evaluate_heads(model: MTPModel, tokenizer, corpus: Corpus, *, context: int, max_positions: int, per_window: int,
                   seed: int, marginal: bool, max_candidates: int, top_p: float = 0.99, chunk_tokens: int = 256,
                   progress: bool = True) -> dict:
    """Per-head top-1 / top-5 and per-rank accuracies on held-out windows of ``corpus``, beside the backbone's own
    marginalization (``marginal``); the defaults of ``mtp eval`` live in :class:`~mtp.config.EvalConfig`."""
    n = model.n_heads
    # windows reach back to the document start (up to 1024 tokens, less where the model's context is shorter):
    # a distilled response is judged with its prompt in view, as in decoding
    left = 1024
    limit = getattr(model.backbone.config, "max_position_embeddings", None)
    if limit:  # BOS + left + the scored positions + their horizon fit the model
        left = min(left, limit - 1 - per_window - (n + 1))
    windows = make_windows(corpus, tokenizer, context=context, max_positions=max_positions, per_window=per_window,
                           horizon=n + 1, seed=seed, left=max(context, left))
    steps = min(n + 1, MAX_MARGINAL_STEPS) if marginal else 1
    evaluator = CachedEvaluator(model.backbone, chunk_tokens)
    hits = torch.zeros(2, n + 1)  # (top-1 / top-5, head)
    chain_hits = []  # (n, P) per window: heads 1..n top-1 right
    rank_hits = torch.zeros(n + 1, RANKS)  # how often rank r of head k is the true token
    mhits = torch.zeros(2, n + 1)
    total = 0
    was_training = model.training
    model.eval()
    for w in tqdm(windows, desc=f"eval {corpus.name}", unit="win", disable=not progress, file=sys.stderr):
        ids = w.input_ids.to(model.backbone.device)
        pos = w.positions.to(ids.device)
        top = head_predictions(model, ids, pos, RANKS)  # (K, P, RANKS)
        targets = torch.stack([ids[pos + 1 + k] for k in range(n + 1)])  # (K, P)
        eq = top == targets[..., None]
        hits[0] += eq[..., 0].sum(-1).cpu()
        hits[1] += eq[..., :5].any(-1).sum(-1).cpu()
        rank_hits += eq.sum(1).cpu()
        chain_hits.append(eq[1:, :, 0].cpu())
        if steps > 1:
            res = marginalize(evaluator, ids, pos, steps, [top_p], max_candidates)
            for d in range(2, steps + 1):
                mtop = res.marginals[d - 1][0].topk(5, dim=-1).indices  # (P, 5)
                mhits[0, d - 1] += (mtop[:, 0] == targets[d - 1]).sum().cpu()
                mhits[1, d - 1] += (mtop == targets[d - 1][:, None]).any(-1).sum().cpu()
        total += len(pos)
    model.train(was_training)
    rows = []
    for k in range(n + 1):
        row = {"head": k, "predicts": f"x_(t+{k + 1})", "top1": float(hits[0, k] / total),
               "top5": float(hits[1, k] / total)}
        if 1 <= k < steps:
            row.update({"marginal_top1": float(mhits[0, k] / total), "marginal_top5": float(mhits[1, k] / total)})
        rows.append(row)
    return {"data": corpus.name, "positions": total, "windows": len(windows), "context": context,
            "marginal": {"top_p": top_p, "max_candidates": max_candidates, "max_steps": steps}, "heads": rows,
            "chain": chain_acceptance(torch.cat(chain_hits, 1)),
            "rank_accuracy": [[round(float(x / total), 5) for x in rank_hits[k]] for k in range(1, n + 1)]}


def eval_table(result: dict) -> str:
    lines = [f"Heads vs marginalization on {result['data']} ({result['positions']} positions, "
             f"context >= {result['context']})", "",
             "| head | predicts | top-1 | top-5 | marginalization top-1 | marginalization top-5 |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["heads"]:
        m1 = f"{r['marginal_top1']:.3f}" if "marginal_top1" in r else ("(NTP)" if r["head"] == 0 else "–")
        m5 = f"{r['marginal_top5']:.3f}" if "marginal_top5" in r else ("(NTP)" if r["head"] == 0 else "–")
        lines.append(f"| {r['head']} | {r['predicts']} | {r['top1']:.3f} | {r['top5']:.3f} | {m1} | {m5} |")
    if "chain" in result:
        c = result["chain"]
        lines += ["", f"A greedy chain of {len(c['accepted'])} drafts: first k accepted "
                      f"{' / '.join(f'{x:.3f}' for x in c['accepted'])}; tokens per target forward (tau) {c['tau']:.2f}"]
    return "\n".join(lines)


def read_eval_result(path: str) -> dict:
    """An ``mtp eval --json`` result, checked for what :func:`compare_table` and the plot read: ``data``,
    ``positions`` and a non-empty list ``heads`` of objects with ``head``, ``top1`` and ``top5`` (and, if
    there, ``marginal_top1`` / ``marginal_top5``) as accuracies; one line naming what is missing otherwise."""
    import math

    fix = "give a file written by `mtp eval --json FILE`"
    result = read_json(path, "result file", fix=fix)

    def bad(field: str, want: str, got) -> UserError:
        return UserError(f"{path}: {field} must be {want}, got {short_repr(got)}: {fix}")

    if not isinstance(result, dict):
        raise bad("the result", "a JSON object", result)
    for key, ok, want in (("data", lambda v: isinstance(v, str), "a string"),
                          ("positions", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                           "a count"),
                          ("heads", lambda v: isinstance(v, list) and v, "a non-empty list of heads")):
        if key not in result:
            raise UserError(f"{path}: {key} is missing: {fix}")
        if not ok(result[key]):
            raise bad(key, want, result[key])
    for i, h in enumerate(result["heads"]):
        if not isinstance(h, dict):
            raise bad(f"heads[{i}]", "an object", h)
        for key in ("head", "top1", "top5", "marginal_top1", "marginal_top5"):
            if key not in h and not key.startswith("marginal"):
                raise UserError(f"{path}: heads[{i}].{key} is missing: {fix}")
            v = h.get(key)
            if key == "head" and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise bad(f"heads[{i}].head", "a head index >= 0", v)
            if key != "head" and key in h and (isinstance(v, bool) or not isinstance(v, (int, float))
                                               or not (math.isfinite(v) and 0 <= v <= 1)):
                raise bad(f"heads[{i}].{key}", "an accuracy in [0, 1]", v)
    return result


def _with_marginals(named: dict[str, dict], key: str) -> dict | None:
    """The first result that carries the backbone's marginalization accuracies (``marginal_<key>``)."""
    return next((r for r in named.values() if any(f"marginal_{key}" in h for h in r["heads"])), None)


def compare_table(named: dict[str, dict]) -> str:
    """Several ``mtp eval`` results (same text) side by side: top-1 / top-5 per head and variant."""
    first = next(iter(named.values()))
    n = max(len(r["heads"]) for r in named.values())
    lines = [f"Per-head accuracy on {first['data']} ({first['positions']} positions); top-1 / top-5", "",
             "| variant | " + " | ".join(f"head {k} (x_(t+{k + 1}))" for k in range(n)) + " |",
             "|---|" + "---:|" * n]
    for name, r in named.items():
        cells = [f"{h['top1']:.3f} / {h['top5']:.3f}" for h in r["heads"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    marg = _with_marginals(named, "top1")
    if marg is not None:
        cells = [f"{h['marginal_top1']:.3f} / {h['marginal_top5']:.3f}" if "marginal_top1" in h else
                 ("(NTP)" if h["head"] == 0 else "–") for h in marg["heads"]]
        lines.append("| marginalization (backbone alone) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_head(named: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, ("top1", "top5")):
        for name, r in named.items():
            ks = [h["head"] for h in r["heads"]]
            ax.plot(ks, [h[key] for h in r["heads"]], marker="o", label=name)
        marg = _with_marginals(named, key)
        if marg is not None:
            pts = [(h["head"], h[f"marginal_{key}"]) for h in marg["heads"] if f"marginal_{key}" in h]
            pts = [(0, marg["heads"][0][key])] + pts
            ax.plot(*zip(*pts), "k--", marker="s", label="marginalization")
        ax.set_xlabel("head k (predicts x_(t+1+k))")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key.replace("top", "top-"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    first = next(iter(named.values()))
    fig.suptitle(f"{first.get('model', '')} heads on {first['data']}")
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def eval_command(cfg: EvalConfig, command: str = "") -> dict:
    """Per-head top-1 / top-5 on held-out text beside the backbone's own marginalization."""
    resolve_backbone(cfg.model)
    model_config = backbone_config(cfg.model)
    check_context(cfg.context + cfg.positions_per_window,
                  f"--context {cfg.context} + --positions-per-window {cfg.positions_per_window}", model_config)
    check_vocab(cfg.max_candidates, "--max-candidates", model_config)
    folder = resolve_heads(cfg.heads, cfg.model)
    if cfg.write_accuracy:  # before any work: never into the installed package, never over one unasked
        check_new_output(folder / ACCURACY, "--write-accuracy", overwrite=cfg.overwrite)
    corpus = next(iter(load_corpora([cfg.data]).values()))
    backbone, tokenizer = load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
    mtp_model = MTPModel.from_pretrained(folder, backbone=backbone)
    result = evaluate_heads(mtp_model, tokenizer, corpus, context=cfg.context, max_positions=cfg.max_positions,
                            per_window=cfg.positions_per_window, seed=cfg.seed, marginal=cfg.marginal,
                            max_candidates=cfg.max_candidates, progress=not cfg.quiet)
    result.update({"model": cfg.model, "heads_dir": str(folder), "command": command})
    if cfg.write_accuracy:  # what `mtp generate` sizes its trees from
        write_accuracy(folder, result["rank_accuracy"], result["data"], result["positions"], command)
        print(f"per-rank accuracies written to {folder}", file=sys.stderr)
    return result


def compare_command(cfg: CompareConfig, command: str = "") -> dict:
    named = {}
    for item in cfg.results:
        name, _, path = item.partition("=")
        named[name] = read_eval_result(str(Path(path).expanduser()))
    return named
