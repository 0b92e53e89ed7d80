"""Pretraining multi-token models from scratch (Gloeckle et al., arXiv 2404.19737), on the heads machinery.

The model is an ordinary Hugging Face Llama built from a config with random weights; its last layer is
the next-token head, and n - 1 ``transformer`` heads (one Llama layer each) read the same *trunk* output,
the hidden state after the layer before it (tap ``layer:L-1``), all through one shared final norm and
unembedding. This is Meta's layout (``layers[-1]`` plus ``extra_heads``), and one ``MTPModel`` serves
pretrained backbones and from-scratch trunks alike. Parameter-matched: with n heads the trunk has n - 1
fewer layers, so every n has the same number of transformer layers (``preset.layers``).

Training is ``mtp train``'s loop in joint mode (memory-efficient head order, checkpoints, resume, JSONL
metrics, DDP / FSDP under torchrun): one code path, not a copy. ``mtp pretrain`` only adds the presets,
the tokenizer (bytes or BPE trained on the corpus), the initial model folder and a held-out evaluation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mtp.backbones import load_backbone, load_tokenizer, local_model_folder
from mtp.config import PretrainConfig, TrainConfig
from mtp.data import load_corpus, packed_blocks
from mtp.errors import UserError
from mtp.heads_format import read_heads_config, write_accuracy
from mtp.io import atomic_dir, write_json
from mtp.model.mtp import MTPModel
from mtp.training.evaluate import RANKS
from mtp.training.losses import head_targets, IGNORE
from mtp.training.train import check_run_folder, init_distributed, train

SPECIALS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class Preset:
    """A from-scratch model size and its default training recipe."""

    hidden: int
    layers: int
    """Transformer layers in all: trunk + next-token layer + extra heads (parameter matching keeps it fixed)."""
    attention_heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    batch_size: int
    lr: float
    max_steps: int
    warmup_steps: int
    bpe_vocab: int = 4096
    context: int = 2048
    """The model's context (max_position_embeddings); --seq-len may not exceed it."""


PRESETS: dict[str, Preset] = {
    # trains in about a minute on 2 CPU cores
    "tiny": Preset(hidden=128, layers=8, attention_heads=4, kv_heads=4, intermediate=384, seq_len=256,
                   batch_size=8, lr=3e-3, max_steps=200, warmup_steps=20, bpe_vocab=2048, context=1024),
    # the n sweep on a CPU: 12 layers, so n = 8 keeps a 4-layer trunk; ~4 k tokens/s per core
    "mini": Preset(hidden=128, layers=12, attention_heads=4, kv_heads=4, intermediate=384, seq_len=256,
                   batch_size=16, lr=3e-3, max_steps=1000, warmup_steps=50, bpe_vocab=2048, context=1024),
    # about an hour on 2 CPU cores
    "small": Preset(hidden=256, layers=10, attention_heads=8, kv_heads=4, intermediate=768, seq_len=512,
                    batch_size=16, lr=2e-3, max_steps=2000, warmup_steps=100, bpe_vocab=4096),
    # GPU sizes
    "base": Preset(hidden=768, layers=16, attention_heads=12, kv_heads=4, intermediate=2048, seq_len=1024,
                   batch_size=32, lr=1e-3, max_steps=20000, warmup_steps=500, bpe_vocab=16384, context=4096),
    "large": Preset(hidden=1536, layers=24, attention_heads=16, kv_heads=8, intermediate=4096, seq_len=2048,
                    batch_size=64, lr=6e-4, max_steps=50000, warmup_steps=1000, bpe_vocab=32768, context=8192),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """Byte-level: ids 0..255 are the bytes, then <pad>, <s>, </s>. Every text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(texts, vocab_size: int):
    """A byte-level BPE trained on ``texts`` (an iterator of strings) with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise UserError(f"a BPE vocabulary needs at least {256 + len(SPECIALS)} entries, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tokenizer(kind: str, data: list[str], vocab_size: int, max_chars: int = 20_000_000):
    """``bytes``, ``bpe`` (trained on the train split of ``data``) or a Hugging Face tokenizer folder."""
    if kind == "bytes":
        return byte_tokenizer()
    if kind == "bpe":
        docs = [d.text for source in data for d in load_corpus(source, split="train").documents]
        if not docs:
            raise UserError(f"no training text in {', '.join(data)} to train a BPE on")

        def capped():
            total = 0
            for text in docs:
                yield text
                total += len(text)
                if total >= max_chars:
                    return
        return train_bpe(capped(), vocab_size)
    path = Path(kind).expanduser()
    if path.is_dir():
        return load_tokenizer(path)
    raise UserError(f"unknown tokenizer {kind!r}: use bytes, bpe or a tokenizer folder")


# ----------------------------------------------------------------------------- the model


def trunk_config(preset: Preset, n_heads: int, vocab_size: int, seq_len: int, tokenizer):
    """A Llama config with ``preset.layers - (n - 1)`` layers: trunk + the next-token layer."""
    from transformers import LlamaConfig

    if n_heads < 1:
        raise UserError(f"--heads must be at least 1 (1 = next-token only), got {n_heads}")
    layers = preset.layers - (n_heads - 1)
    if layers < 2:
        raise UserError(f"preset has {preset.layers} layers: too few for {n_heads} heads and a trunk")
    return LlamaConfig(vocab_size=vocab_size, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                       num_hidden_layers=layers, num_attention_heads=preset.attention_heads,
                       num_key_value_heads=preset.kv_heads, max_position_embeddings=preset.context,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def write_initial_model(out: Path, config, tokenizer, seed: int) -> Path:
    """The randomly initialized trunk as a Hugging Face folder (weights + tokenizer): the run's backbone."""
    from transformers import LlamaForCausalLM

    folder = out / "init"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _train_config(cfg: PretrainConfig, preset: Preset, init: Path, trunk_layers: int):
    lr = cfg.lr or preset.lr
    steps = cfg.max_steps or preset.max_steps
    return TrainConfig(model=str(init.resolve()), out=cfg.out, heads=cfg.heads - 1, kind="transformer",
                       tap=f"layer:{trunk_layers - 1}", init_from_last=False, mode="joint",
                       data=list(cfg.data), seq_len=cfg.seq_len or preset.seq_len,
                       batch_size=cfg.batch_size or preset.batch_size, max_steps=steps, lr=lr, backbone_lr=lr,
                       warmup_steps=min(preset.warmup_steps, max(1, steps // 10)), min_lr_ratio=0.1,
                       weight_decay=0.1, clip=1.0, ntp_weight=1.0, head_weights="constant",
                       save_every=cfg.save_every, log_every=cfg.log_every, resume=cfg.resume, seed=cfg.seed,
                       overwrite=cfg.overwrite,
                       device=cfg.device, dtype=cfg.dtype, autocast=cfg.autocast)


PRETRAIN_ENTRIES = ("init", "checkpoint", "heads", "metrics.jsonl", "pretrain.json", "eval.json")
"""What a pretraining run writes into --out."""


def pretrain(cfg: PretrainConfig, progress: bool = True, command: str = "") -> dict:
    """Build (or reuse, on --resume) the initial model, train it with ``mtp.training.train.train``, evaluate per head."""
    preset = get_preset(cfg.preset)
    ddp, _ = init_distributed(cfg.device)  # under torchrun: rank 0 builds the initial model, the others wait
    out = Path(cfg.out)
    init = out / "init"
    seq_len = cfg.seq_len or preset.seq_len
    if seq_len > preset.context:
        raise UserError(f"--seq-len {seq_len} is above the {cfg.preset!r} model's context ({preset.context} tokens)")
    if cfg.resume:
        if not (init / "config.json").is_file():
            raise UserError(f"--resume: {init} holds no initial model (was {out} made by mtp pretrain?)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(init, local_files_only=True)
        if config.model_type != "llama" or config.hidden_size != preset.hidden or \
                config.num_hidden_layers != preset.layers - (cfg.heads - 1):
            raise UserError(f"--resume: {init} is not a preset {cfg.preset!r} model with {cfg.heads} heads")
        trunk_layers = config.num_hidden_layers
    else:
        check_run_folder(out, False, cfg.overwrite, main=ddp.main, entries=PRETRAIN_ENTRIES)
        if ddp.main:
            import shutil

            shutil.rmtree(init, ignore_errors=True)  # --overwrite: a new run (checkpoint and log go in train)
            for name in ("pretrain.json", "eval.json"):
                (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            tokenizer = make_tokenizer(cfg.tokenizer, list(cfg.data), cfg.vocab_size or preset.bpe_vocab)
            config = trunk_config(preset, cfg.heads, len(tokenizer), seq_len, tokenizer)
            write_initial_model(out, config, tokenizer, cfg.seed)
            write_json(out / "pretrain.json", {"config": asdict(cfg), "preset": asdict(preset), "command": command})
        if ddp.world > 1:
            import torch.distributed as dist

            dist.barrier()
        from transformers import AutoConfig

        trunk_layers = AutoConfig.from_pretrained(init, local_files_only=True).num_hidden_layers
    tcfg = _train_config(cfg, preset, init, trunk_layers)
    fresh = not cfg.resume
    try:
        summary = train(tcfg, progress=progress, command=command)
    except UserError:
        if fresh and ddp.main and not (out / "checkpoint").exists():  # nothing trained: leave no half-made run
            import shutil

            shutil.rmtree(init, ignore_errors=True)
            (out / "pretrain.json").unlink(missing_ok=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    if not ddp.main:
        return {"steps": summary["steps"]}
    result = evaluate_pretrained(out / "heads", list(cfg.data), tcfg.seq_len, cfg.eval_tokens, cfg.device,
                                 cfg.dtype)
    result.update({"steps": summary["steps"], "preset": cfg.preset, "n": cfg.heads, "tokenizer": cfg.tokenizer,
                   "command": command})
    write_json(out / "eval.json", result)
    if cfg.heads > 1:  # `mtp generate` / `mtp bench decode` size drafts and trees from it
        write_accuracy(out / "heads", result["rank_accuracy"], f"{', '.join(cfg.data)} (eval split)",
                       result["eval_tokens"], command)
    return result


@torch.inference_mode()
def evaluate_pretrained(heads_dir: Path, data: list[str], seq_len: int, eval_tokens: int, device: str = "cpu",
                        dtype: str = "float32", model=None) -> dict:
    """Held-out loss (nats per token) and top-1 accuracy of every head on the eval split of ``data``."""
    if model is None:
        meta = read_heads_config(heads_dir)
        backbone, tokenizer = load_backbone(meta["backbone"], dtype=dtype, device=device)
        model = MTPModel.from_pretrained(heads_dir, backbone=backbone)
    else:
        tokenizer = None
    if tokenizer is None:
        tokenizer = load_tokenizer(local_model_folder(model.config.backbone), "backbone")
    model.eval()
    blocks, _ = packed_blocks(data, tokenizer, seq_len, split="eval", max_tokens=eval_tokens)
    n = model.n_heads + 1
    n_bytes = sum(len(tokenizer.decode(b.tolist()).encode()) for b in blocks)
    loss_sum, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    rank_hits = torch.zeros(n, RANKS)  # rank 0: top-1
    dev = model.backbone.device
    for i in range(0, len(blocks), 4):
        ids = blocks[i:i + 4].to(dev)
        final, states = model.trunk(ids)
        for k in range(n):
            h = final if k == 0 else model.head_hidden(k, states, tokens=ids)
            logits = model.logits(h, normed=k == 0).float()
            targets = head_targets(ids, k, None)
            valid = targets != IGNORE
            loss_sum[k] += torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum").double()
            top = logits[valid].topk(min(RANKS, logits.shape[-1]), dim=-1).indices
            right = top == targets[valid][:, None]
            rank_hits[k, :right.shape[1]] += right.sum(0).float()
            count[k] += valid.sum()
    heads = [{"head": k, "predicts": f"x_(t+{k + 1})", "loss": float(loss_sum[k] / count[k]),
              "top1": float(rank_hits[k, 0] / count[k])} for k in range(n)]
    # bits per byte of text make byte-level and BPE models comparable (next-token head)
    bpb = float(loss_sum[0] / math.log(2) / max(1, n_bytes) * blocks.numel() / max(1.0, float(count[0])))
    # how often rank r of head k is right: what decoding sizes its drafts and trees from (accuracy.json)
    ranks = [[round(float(rank_hits[k, r] / count[k]), 5) for r in range(RANKS)] for k in range(1, n)]
    return {"eval_tokens": int(blocks.numel()), "eval_bytes": n_bytes, "heads": heads, "ntp_loss": heads[0]["loss"],
            "ntp_bits_per_byte": bpb, "rank_accuracy": ranks}


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def pretrain_command(cfg: PretrainConfig, command: str = "") -> dict | None:
    result = pretrain(cfg, progress=not cfg.quiet, command=command)
    return {**result, "out": cfg.out} if "heads" in result else None  # None: not rank 0 under torchrun


def show_pretrain(r: dict) -> str:
    lines = [f"held-out ({r['eval_tokens']} tokens): next-token loss {r['ntp_loss']:.4f} nats, "
             f"{r['ntp_bits_per_byte']:.3f} bits/byte", "| head | predicts | loss | top-1 |", "|---:|---|---:|---:|"]
    lines += [f"| {h['head']} | {h['predicts']} | {h['loss']:.4f} | {h['top1']:.3f} |" for h in r["heads"]]
    out = r["out"]
    return "\n".join(lines + [f"model: {out}/heads (backbone {out}/init + trained weights); log: {out}/metrics.jsonl"])
