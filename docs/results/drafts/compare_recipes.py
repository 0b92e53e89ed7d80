"""EAGLE-3 training recipes side by side: identical batches, one run, held-out answers (issue 22).

One backbone forward per batch captures every layer any variant reads; each variant then takes its own
training step (`mtp train`'s step: the memory-efficient training-time test) with its own optimizer and
schedule, on the same tokens. Every --eval-every steps all variants are scored on the same held-out blocks
(`mtp train --eval-data`'s figures: loss, top-1 per draft step, chain acceptance); each variant's time per
step is logged too (bf16 autocast is a speed question as much as an accuracy one).

    python compare_recipes.py OUT TRAIN.jsonl [...] --eval HELDOUT.jsonl --steps 300 --batch-size 4 \\
        --variant base: --variant init=target --variant vocab=8192 --variant ttt=6

A variant is NAME:key=value,key=value (NAME defaults to the pairs): init (random | target), loss (hard | soft:
the target's distribution, `--draft-loss`), ttt (draft steps
trained), vocab (draft vocabulary), lr, min_lr (cosine floor, a ratio), warmup, autocast (on | off), layers
(auto | default | I/J/K), weights (constant | decay:G). Unset keys take the base recipe below.
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from mtp.backbones import load_backbone
from mtp.data import packed_blocks, target_counts, top_tokens
from mtp.hf_compat import first_layers
from mtp.model.eagle3 import auto_layers, parse_layers
from mtp.model.heads import capture_hidden
from mtp.model.mtp import HeadsConfig, MTPModel
from mtp.training.evaluate import heldout_scores
from mtp.training.losses import head_weights
from mtp.training.train import lr_factor, mtp_step

BASE = {"init": "random", "loss": "hard", "ttt": 4, "vocab": 16384, "lr": 1e-3, "min_lr": 0.1, "warmup": 15,
        "autocast": "off", "layers": "auto", "weights": "decay:0.8"}


def parse_variant(spec: str) -> tuple[str, dict]:
    name, sep, pairs = spec.partition(":")
    if not sep or "=" in name:  # no name: the pairs name it
        name, pairs = "", spec
    v = dict(BASE)
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        if key not in BASE:
            raise SystemExit(f"unknown variant key {key!r}: use {', '.join(BASE)}")
        v[key] = value.replace("/", ",") if isinstance(BASE[key], str) else type(BASE[key])(value)
    return name or pairs or "base", v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--eval", nargs="+", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument("--chain", type=int, default=4, help="draft steps in the reported chain")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(args.model)
    backbone.requires_grad_(False)
    n_layers = backbone.config.num_hidden_layers
    blocks, masks = packed_blocks(args.data, tokenizer, args.seq_len,
                                  max_tokens=args.steps * args.batch_size * args.seq_len, seed=0)
    eval_blocks, eval_masks = packed_blocks(args.eval, tokenizer, args.seq_len,
                                            max_tokens=args.eval_blocks * args.seq_len, seed=0)
    eval_blocks, eval_masks = eval_blocks[:args.eval_blocks], eval_masks[:args.eval_blocks]
    counts = target_counts(blocks, masks, backbone.get_output_embeddings().weight.shape[0])
    auto = None
    variants = dict(parse_variant(s) for s in args.variant)
    models, opts = {}, {}
    for name, v in variants.items():
        if v["layers"] == "auto" and auto is None:
            auto, _ = auto_layers(backbone, blocks)
        layers = auto if v["layers"] == "auto" else parse_layers(v["layers"], n_layers)
        torch.manual_seed(0)
        m = MTPModel(backbone, HeadsConfig(backbone=args.model, n_heads=v["ttt"], kind="eagle3", eagle_layers=layers,
                                           recipe={"compare_recipes": v}))
        if v["init"] != "random":
            m.eagle.init_from_target(backbone, int(v["init"][7:]) if ":" in v["init"] else None)
        m.set_draft_vocab(top_tokens(counts, v["vocab"]))
        m.token_counts = counts
        m.train()
        models[name] = m
        opts[name] = torch.optim.AdamW(m.head_parameters(), lr=v["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    union = sorted({i for m in models.values() for i in m.tapped})
    print(json.dumps({"variants": variants, "taps": {k: m.tapped for k, m in models.items()},
                      "train_tokens": int(masks[: args.steps * args.batch_size].sum()),
                      "eval_tokens": int(eval_masks.sum())}), flush=True)
    with torch.no_grad(), capture_hidden(backbone, union) as store:
        states = []
        for a in range(0, len(eval_blocks), 8):
            backbone.get_decoder()(input_ids=eval_blocks[a:a + 8])
            states.append({i: store[i] for i in union})
        eval_states = {i: torch.cat([s[i] for s in states]) for i in union}
    log = (out / "log.jsonl").open("w")
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    steps = min(args.steps, len(blocks) // args.batch_size)
    seconds = {name: 0.0 for name in models}
    for step in range(steps):
        idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
        ids, mask = blocks[idx], masks[idx]
        soft = any(v["loss"] == "soft" for v in variants.values())  # the final state teaches: the whole backbone
        with torch.no_grad(), capture_hidden(backbone, union) as store, \
                (contextlib.nullcontext() if soft else first_layers(backbone, max(union))):
            final = backbone.get_decoder()(input_ids=ids).last_hidden_state  # normed; else no further than the taps
        rec = {"step": step + 1}
        for name, m in models.items():
            v = variants[name]
            t0 = time.perf_counter()
            for g in opts[name].param_groups:
                g["lr"] = v["lr"] * lr_factor(step, v["warmup"], steps, v["min_lr"])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v["autocast"] == "on"):
                losses = mtp_step(m, ids, head_weights(v["ttt"], 1.0, v["weights"]), train_backbone=False,
                                  hidden=[store[i] for i in m.tapped] + ([final] if v["loss"] == "soft" else []),
                                  loss_mask=mask, soft=v["loss"] == "soft")
            torch.nn.utils.clip_grad_norm_(m.head_parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            seconds[name] += time.perf_counter() - t0
            rec[name] = [round(x, 4) for x in losses[1:]]
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            rec["eval"] = {}
            for name, m in models.items():
                s = heldout_scores(m, eval_blocks, eval_masks, [eval_states[i] for i in m.tapped])
                chain = s["accepted"][:args.chain]
                rec["eval"][name] = {**s, "tau_chain": round(1 + sum(chain), 4),
                                     "seconds_per_step": round(seconds[name] / (step + 1), 3)}
            print(json.dumps({"step": step + 1, **{k: (e["top1"][:args.chain], e["tau_chain"])
                                                   for k, e in rec["eval"].items()}}), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    final = {name: rec["eval"][name] for name in models}
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "variants": variants, "final": final},
                                                 indent=1))
    lines = [f"| variant | held-out top-1, draft step 1..{args.chain} | chain of {args.chain}: tau | s / step |",
             "|---|---|---:|---:|"]
    for name, e in final.items():
        lines.append(f"| {name} | {' / '.join(f'{x:.3f}' for x in e['top1'][:args.chain])} | {e['tau_chain']:.3f} | "
                     f"{e['seconds_per_step']:.2f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    for name, m in models.items():
        m.save_pretrained(out / name.replace("/", "_").replace(":", "_").replace("=", "_").replace(",", "_"))


if __name__ == "__main__":
    main()
