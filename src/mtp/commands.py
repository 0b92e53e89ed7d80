"""Run functions of the subcommands whose work spans several stages, and their formatters (``mtp.cli``'s table).

Each run function takes its typed config (``mtp.config``) and the command line that asked for it, and returns
a result (what ``--json`` writes) or None; each formatter turns a result into the text printed. Benchmarks,
``export`` and ``engines`` have theirs in their own modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mtp.config import (AnalyzeConfig, CompareConfig, ConvertConfig, EvalConfig, GenerateConfig,
                        HEAD_METHODS, PretrainConfig, TrainConfig)


def analyze(cfg: AnalyzeConfig, command: str = "") -> dict:
    """How much multi-token prediction the models already have; plots into cfg.out."""
    from mtp.analysis.plots import write_plots
    from mtp.analysis.run import analyze as run_analysis

    report = run_analysis(cfg, progress=not cfg.quiet)
    report["command"] = command
    if cfg.out:
        for path in write_plots(report, cfg.out):
            print(f"plot: {path}", file=sys.stderr)
    return report


def train(cfg: TrainConfig, command: str = "") -> dict:
    from mtp.backbones import backbone_config, check_context
    from mtp.model.heads import parse_tap
    from mtp.training.train import train as run_train

    model_config = backbone_config(cfg.model)  # before the data and the weights
    check_context(cfg.seq_len, "--seq-len", model_config)
    parse_tap(cfg.tap, model_config.num_hidden_layers)  # --tap layer:I within the model's layers
    summary = run_train(cfg, progress=not cfg.quiet, command=command)
    return {**summary, "log": f"{cfg.out}/metrics.jsonl"} if summary.get("heads") else None  # None: not rank 0


def show_train(summary: dict) -> str:
    return f"heads: {summary['heads']}  (log: {summary['log']}, {summary['steps']} steps)"


def show_distill(summary: dict) -> str:
    return (f"distilled {summary['prompts']} prompts ({summary['records']} answers, {summary['response_tokens']} "
            f"tokens, {summary['tokens_per_s']:.0f} tokens/s) into {summary['out']} "
            f"({summary['finished_share']:.0%} ended with EOS)")


def evaluate(cfg: EvalConfig, command: str = "") -> dict:
    """Per-head top-1 / top-5 on held-out text beside the backbone's own marginalization."""
    from mtp.analysis.run import load_corpora
    from mtp.backbones import backbone_config, check_context, check_vocab, load_backbone, resolve_backbone
    from mtp.heads_format import resolve_heads
    from mtp.model.mtp import MTPModel
    from mtp.training.evaluate import evaluate_heads

    resolve_backbone(cfg.model)
    model_config = backbone_config(cfg.model)
    check_context(cfg.context + cfg.positions_per_window,
                  f"--context {cfg.context} + --positions-per-window {cfg.positions_per_window}", model_config)
    check_vocab(cfg.max_candidates, "--max-candidates", model_config)
    folder = resolve_heads(cfg.heads, cfg.model)
    if cfg.write_accuracy:  # before any work: never into the installed package, never over one unasked
        from mtp.heads_format import ACCURACY
        from mtp.io import check_new_output

        check_new_output(folder / ACCURACY, "--write-accuracy", overwrite=cfg.overwrite)
    corpus = next(iter(load_corpora([cfg.data]).values()))
    backbone, tokenizer = load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
    mtp_model = MTPModel.from_pretrained(folder, backbone=backbone)
    result = evaluate_heads(mtp_model, tokenizer, corpus, context=cfg.context, max_positions=cfg.max_positions,
                            per_window=cfg.positions_per_window, seed=cfg.seed, marginal=cfg.marginal,
                            max_candidates=cfg.max_candidates, progress=not cfg.quiet)
    result.update({"model": cfg.model, "heads_dir": str(folder), "command": command})
    if cfg.write_accuracy:  # what `mtp generate` sizes its trees from
        from mtp.heads_format import write_accuracy

        write_accuracy(folder, result["rank_accuracy"], result["data"], result["positions"], command)
        print(f"per-rank accuracies written to {folder}", file=sys.stderr)
    return result


def compare(cfg: CompareConfig, command: str = "") -> dict:
    from mtp.training.evaluate import read_eval_result

    named = {}
    for item in cfg.results:
        name, _, path = item.partition("=")
        named[name] = read_eval_result(str(Path(path).expanduser()))
    return named


def generate(cfg: GenerateConfig, command: str = "") -> dict:
    """Stream the model's answer; the result holds tokens/s, tokens per step and the speedup over plain decoding."""
    from mtp.decode.run import (Streamer, adaptive_sizes, build_decoder, choose_method, encode_prompt, eos_ids,
                                load_for_decoding)

    heads, method = choose_method(cfg.model, cfg.heads, cfg.method)
    backbone, tokenizer, mtp_model, folder = load_for_decoding(cfg.model, heads if method in HEAD_METHODS else None,
                                                              cfg.dtype, cfg.device,
                                                              {"--max-new-tokens": cfg.max_new_tokens}, cfg.exit_layer)
    ids, eos = encode_prompt(tokenizer, cfg.prompt, cfg.chat), eos_ids(backbone, tokenizer)
    decoder, sizing = build_decoder(backbone, tokenizer, mtp_model, folder, cfg.model, method, cfg)
    decoder.generate([ids], 4, eos)  # warm-up, so the figures below are not first-call costs
    out = decoder.generate([ids], cfg.max_new_tokens, eos, stop_strings=cfg.stop, callback=Streamer(tokenizer))
    sys.stdout.write("\n")
    row = out.rows[0]
    result = {"method": method, "sizes": {k: v for k, v in sizing.as_dict().items() if k not in ("method", "tree", "adaptive")},
              "adapted": adaptive_sizes(decoder), "tokens": len(row.tokens), "seconds": out.seconds,
              "tokens_per_s": len(row.tokens) / out.seconds, "tau": row.acceptance_length, "dtype": cfg.dtype,
              "greedy": cfg.temperature == 0, "command": command}
    if cfg.compare and method != "plain":
        plain, _ = build_decoder(backbone, tokenizer, None, None, cfg.model, "plain", cfg)
        ref = plain.generate([ids], cfg.max_new_tokens, eos, stop_strings=cfg.stop)
        result.update(plain_tokens_per_s=len(ref.rows[0].tokens) / ref.seconds,
                      identical=ref.rows[0].tokens == row.tokens)
        result["speedup"] = result["tokens_per_s"] / result["plain_tokens_per_s"]
    return result


def show_generate(r: dict) -> str:
    sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
    if (a := r["adapted"]) is not None:
        unit = "draft length" if r["method"] == "blockwise" else "nodes"
        sizes += f", re-sized while decoding: {unit} {a['min']}-{a['max']}, last {a['final']}"
    line = (f"[{r['method']}{' (' + sizes + ')' if sizes else ''}] {r['tokens']} tokens in {r['seconds']:.2f} s: "
            f"{r['tokens_per_s']:.1f} tokens/s, {r['tau']:.2f} tokens per backbone forward")
    if "speedup" not in r:
        return line
    if r["identical"]:
        same = "identical output"
    elif not r["greedy"]:
        same = "output differs (sampling: same distribution, different draw)"
    elif r["dtype"] in ("bfloat16", "float16"):
        same = (f"output differs from plain {r['dtype']} decoding by rounding (a k-token forward rounds differently "
                f"from k one-token forwards; float32 is token-identical)")
    else:
        same = "OUTPUT DIFFERS"
    return line + f"; plain decoding {r['plain_tokens_per_s']:.1f} tokens/s: speedup {r['speedup']:.2f}x, {same}"


def pretrain(cfg: PretrainConfig, command: str = "") -> dict | None:
    from mtp.training.pretrain import pretrain as run_pretrain

    result = run_pretrain(cfg, progress=not cfg.quiet, command=command)
    return {**result, "out": cfg.out} if "heads" in result else None  # None: not rank 0 under torchrun


def show_pretrain(r: dict) -> str:
    lines = [f"held-out ({r['eval_tokens']} tokens): next-token loss {r['ntp_loss']:.4f} nats, "
             f"{r['ntp_bits_per_byte']:.3f} bits/byte", "| head | predicts | loss | top-1 |", "|---:|---|---:|---:|"]
    lines += [f"| {h['head']} | {h['predicts']} | {h['loss']:.4f} | {h['top1']:.3f} |" for h in r["heads"]]
    out = r["out"]
    return "\n".join(lines + [f"model: {out}/heads (backbone {out}/init + trained weights); log: {out}/metrics.jsonl"])


def convert(cfg: ConvertConfig, command: str = "") -> dict:
    from mtp.convert import convert_meta

    heads_dir = convert_meta(cfg.checkpoint, cfg.out, cfg.tokenizer, cfg.dtype, overwrite=cfg.overwrite)
    return {"heads": str(heads_dir), "backbone": str(Path(cfg.out).expanduser().resolve() / "backbone")}


def show_convert(r: dict) -> str:
    return f"heads: {r['heads']}  (backbone: {r['backbone']})"
