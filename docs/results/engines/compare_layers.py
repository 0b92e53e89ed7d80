"""--eagle-layers auto against the default (2, L//2, L-3), at equal budget on identical batches.

One backbone forward per batch captures every layer either head reads; each head then takes its own
training step (the same memory-efficient training-time-test step `mtp train` uses) on the same tokens. All
batches are new to both heads (one epoch at most), so the per-step losses are held-out figures; the heads are
saved for `mtp eval` on held-out distilled answers too.

    python compare_layers.py OUT_DIR DATA.jsonl [DATA.jsonl ...] --steps 100 --batch-size 4 --heads 3
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mtp.backbones import load_backbone
from mtp.data import packed_blocks, target_counts, top_tokens
from mtp.training.losses import head_weights
from mtp.model.eagle3 import auto_layers, default_layers
from mtp.model.heads import capture_hidden
from mtp.model.mtp import HeadsConfig, MTPModel
from mtp.training.train import lr_factor, mtp_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--draft-vocab", type=int, default=16384)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone("smollm2-135m")
    backbone.requires_grad_(False)
    n = backbone.config.num_hidden_layers
    blocks, masks = packed_blocks(args.data, tokenizer, args.seq_len,
                                  max_tokens=args.steps * args.batch_size * args.seq_len, seed=0)
    counts = target_counts(blocks, masks, backbone.get_output_embeddings().weight.shape[0])
    auto, kl = auto_layers(backbone, blocks)
    variants = {"default": default_layers(n), "auto": auto}
    print(json.dumps({"layers": variants, "lens_kl": [round(x, 3) for x in kl]}), flush=True)
    models, opts = {}, {}
    for name, layers in variants.items():
        torch.manual_seed(0)
        m = MTPModel(backbone, HeadsConfig(backbone="smollm2-135m", n_heads=args.heads, kind="eagle3",
                                           eagle_layers=layers))
        m.set_draft_vocab(top_tokens(counts, args.draft_vocab))
        m.token_counts = counts
        m.train()
        models[name] = m
        opts[name] = torch.optim.AdamW(m.head_parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    union = sorted(set(variants["default"]) | set(variants["auto"]))
    weights = head_weights(args.heads, 1.0, "decay:0.8")
    log = (out / "losses.jsonl").open("w")
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    for step in range(min(args.steps, len(blocks) // args.batch_size)):
        idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
        ids, mask = blocks[idx], masks[idx]
        t0 = time.time()
        with torch.no_grad(), capture_hidden(backbone, union) as store:
            backbone.get_decoder()(input_ids=ids)
        rec = {"step": step + 1}
        for name, m in models.items():
            for g in opts[name].param_groups:
                g["lr"] = args.lr * lr_factor(step, 10, args.steps, 0.1)
            losses = mtp_step(m, ids, weights, train_backbone=False, hidden=[store[i] for i in m.tapped],
                              loss_mask=mask)
            torch.nn.utils.clip_grad_norm_(m.head_parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            rec[name] = [round(x, 4) for x in losses[1:]]
        rec["seconds"] = round(time.time() - t0, 1)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)
    for name, m in models.items():
        m.save_pretrained(out / name)


if __name__ == "__main__":
    main()
