"""``mtp convert``: Meta's multi-token checkpoints (Gloeckle et al.'s 7B release layout) into ``MTPModel``.

Meta's layout is Llama's consolidated state dict plus ``params.json`` with ``n_future_tokens``: the
``layers`` (trunk + the next-token layer, ``layers[-1]``) and ``extra_heads`` (n - 1 more layers), every
head reading the trunk output (the hidden state before ``layers[-1]``), all through ``norm`` and
``output``. That is exactly a Hugging Face Llama with ``len(layers)`` layers plus ``transformer`` heads on
the tap ``layer:len(layers)-1``, so the conversion is a renaming, plus the q/k row permutation between
Meta's interleaved rotary embedding and Hugging Face's half-split one (as transformers' own Llama
conversion script does).

Weights load with ``torch.load(weights_only=True)`` (no arbitrary unpickling) or from safetensors.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from mtp.backbones import check_tokenizer_vocab, DTYPES, load_tokenizer
from mtp.config import check_type, ConvertConfig
from mtp.errors import UserError
from mtp.io import atomic_dir, check_new_output, read_json, write_json
from mtp.model.mtp import HeadsConfig, MTPModel

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's rotate-half rows, per head."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary` (Hugging Face -> Meta)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# params.json: field -> (type, required, lowest, highest). Bounds far above any released model, so that a
# corrupt file is refused before anything is loaded or allocated.
_PARAMS = {"dim": (int, True, 1, 65536), "n_heads": (int, True, 1, 1024), "n_kv_heads": (int, False, 1, 1024),
           "n_layers": (int, False, 1, 1024), "n_future_tokens": (int, False, 1, 65),
           "max_seq_len": (int, False, 1, 1 << 20), "norm_eps": (float, False, 1e-12, 1.0),
           "rope_theta": (float, False, 1.0, 1e9)}


MAX_VOCAB = 1 << 24  # far above any released model's vocabulary


def parse_meta_params(params, path: Path) -> dict:
    """params.json checked: an object whose known fields have their type and a plausible range (vocab_size: -1,
    Meta's "as many as the embedding has", or at least 1; unknown fields, such as multiple_of, are kept unread);
    one line naming the field otherwise."""
    fix = "fix params.json (it comes with Meta's checkpoint)"
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a JSON object of model parameters, got {type(params).__name__}: {fix}")
    out = dict(params)
    for key, (kind, required, low, high) in _PARAMS.items():
        if params.get(key) is None:
            if required:
                raise UserError(f"{path}: {key} is missing: {fix}")
            out.pop(key, None)
            continue
        value = check_type(f"{path}: {key}", kind, params[key], fix)
        if not low <= value <= high:
            raise UserError(f"{path}: {key} must be between {low:g} and {high:g}, got {value}: {fix}")
        out[key] = value
    out["vocab_size"] = -1  # absent, null or -1 (Llama's release): as many as the embedding has
    if params.get("vocab_size") not in (None, -1):
        out["vocab_size"] = check_type(f"{path}: vocab_size", int, params["vocab_size"], fix)
        if not 1 <= out["vocab_size"] <= MAX_VOCAB:
            raise UserError(f"{path}: vocab_size must be -1 or between 1 and {MAX_VOCAB}, got "
                            f"{out['vocab_size']}: {fix}")
    dim, n_heads, n_kv = out["dim"], out["n_heads"], out.get("n_kv_heads", out["n_heads"])
    if dim % n_heads or (dim // n_heads) % 2:
        raise UserError(f"{path}: dim {dim} must be n_heads ({n_heads}) times an even head size: {fix}")
    if n_heads % n_kv:
        raise UserError(f"{path}: n_kv_heads ({n_kv}) must divide n_heads ({n_heads}): {fix}")
    return out


def check_meta_shapes(params: dict, state: dict, layers: dict, extra: dict) -> tuple[int, int]:
    """Every tensor the conversion reads has the shape params.json implies (dim, n_heads, n_kv_heads, its
    vocab_size or else at least one token, one feed-forward width in every layer and extra head) and floating-point
    values; returns (vocabulary, feed-forward width). One line naming the tensor, the expected and the found shape."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    sizes = f"params.json: dim {dim}, {n_heads} heads, {n_kv} kv heads"
    for key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        if key not in state:
            raise UserError(f"the checkpoint lacks {key}")

    def check(name: str, t: torch.Tensor, shape: tuple) -> None:
        if tuple(t.shape) != shape:
            shown = "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
            raise UserError(f"the checkpoint's {name} has shape {tuple(t.shape)}, expected {shown} ({sizes}): "
                            "the checkpoint is damaged or does not belong to this params.json")
        if not t.is_floating_point():
            raise UserError(f"the checkpoint's {name} holds {str(t.dtype).removeprefix('torch.')} values, "
                            "expected floating point: the checkpoint is damaged")

    def size(t: torch.Tensor, what: str) -> int | str:
        """A size read off a 2-D tensor's first dimension; where there is none, what it should be."""
        return t.shape[0] if t.dim() == 2 and t.shape[0] >= 1 else f"{what} >= 1"

    emb = state["tok_embeddings.weight"]
    vocab = params.get("vocab_size", -1)  # parse_meta_params: -1 (as many as the embedding has) or >= 1
    if vocab == -1:
        vocab = size(emb, "vocab_size")
    check("tok_embeddings.weight", emb, (vocab, dim))
    check("output.weight", state["output.weight"], (vocab, dim))
    check("norm.weight", state["norm.weight"], (dim,))
    w1 = layers[0].get("feed_forward.w1.weight")
    if w1 is None:
        raise UserError("the checkpoint's layers.0 lacks feed_forward.w1.weight")
    inter = size(w1, "ffn hidden size")  # one width in every layer and extra head (a Llama config has one)
    head_dim = dim // n_heads
    expect = {"attention.wq.weight": (n_heads * head_dim, dim), "attention.wk.weight": (n_kv * head_dim, dim),
              "attention.wv.weight": (n_kv * head_dim, dim), "attention.wo.weight": (dim, n_heads * head_dim),
              "feed_forward.w1.weight": (inter, dim), "feed_forward.w3.weight": (inter, dim),
              "feed_forward.w2.weight": (dim, inter), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    for prefix, group in (("layers", layers), ("extra_heads", extra)):
        for i, meta in group.items():
            missing = [k for k in _LAYER_MAP if k not in meta]
            if missing:
                raise UserError(f"the checkpoint's {prefix}.{i} lacks {', '.join(missing)}")
            for k, shape in expect.items():
                check(f"{prefix}.{i}.{k}", meta[k], shape)
    return vocab, inter


def read_meta_checkpoint(folder: Path) -> tuple[dict, dict]:
    """params.json (checked first) and the state dict (consolidated*.pth via the safe loader, or *.safetensors)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder with a Meta checkpoint (params.json + consolidated.pth)")
    if not (folder / "params.json").exists():
        raise UserError(f"{folder} has no params.json")
    params = parse_meta_params(read_json(folder / "params.json", "params file", fix="restore params.json"),
                               folder / "params.json")
    shards = sorted(folder.glob("consolidated*.safetensors")) or sorted(folder.glob("consolidated*.pth"))
    if not shards:
        raise UserError(f"{folder} has no consolidated*.pth or consolidated*.safetensors")
    if len(shards) > 1:
        raise UserError(f"{folder} holds {len(shards)} model-parallel shards: merge them first (one consolidated "
                        "file is supported)")
    path = shards[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return params, state


def _layer_states(state: dict, prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    pattern = re.compile(rf"^{prefix}\.(\d+)\.(.+)$")
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if layers and sorted(layers) != list(range(len(layers))):
        raise UserError(f"{prefix}: layer indices {sorted(layers)} have gaps")
    return layers


def _hf_layer(meta: dict[str, torch.Tensor], n_heads: int, n_kv: int, where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in _LAYER_MAP if k not in meta]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}")
    out = {}
    for k, name in _LAYER_MAP.items():
        w = meta[k]
        if k == "attention.wq.weight":
            w = permute_rotary(w, n_heads)
        elif k == "attention.wk.weight":
            w = permute_rotary(w, n_kv)
        out[name] = w
    return out


def convert_meta(folder: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Write ``out/backbone`` (a Hugging Face Llama folder) and ``out/heads`` (the extra heads); return the
    heads folder, which ``MTPModel.from_pretrained`` and ``mtp generate --heads`` take."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out).expanduser().resolve()
    tok = load_tokenizer(tokenizer, "--tokenizer") if tokenizer else None  # before the weights load
    check_new_output(out, "--out", overwrite=True, inputs=[folder])  # a file, the package, the checkpoint itself
    if ((out / "heads").exists() or (out / "backbone").exists()) and not overwrite:
        raise UserError(f"{out} already holds a conversion: choose another --out, or pass --overwrite to replace it")
    params, state = read_meta_checkpoint(Path(folder))
    n_future, dim, n_heads = params.get("n_future_tokens", 1), params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    layers, extra = _layer_states(state, "layers"), _layer_states(state, "extra_heads")
    if not layers:
        raise UserError("the checkpoint has no layers.* weights: not a Llama consolidated state dict")
    if n_future > 1 and not extra:
        raise UserError(f"params.json says n_future_tokens = {n_future} but the checkpoint has no extra_heads")
    if len(extra) != n_future - 1:
        raise UserError(f"params.json says n_future_tokens = {n_future} but there are {len(extra)} extra_heads "
                        f"(expected {n_future - 1})")
    if "n_layers" in params and params["n_layers"] not in (len(layers), len(layers) + len(extra)):
        raise UserError(f"params.json says n_layers = {params['n_layers']} but the checkpoint has {len(layers)} "
                        f"layers and {len(extra)} extra heads")
    vocab, inter = check_meta_shapes(params, state, layers, extra)
    if tok is not None:
        check_tokenizer_vocab(tok, vocab, f"--tokenizer {tokenizer}")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}")
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=inter, num_hidden_layers=len(layers),
                         num_attention_heads=n_heads, num_key_value_heads=n_kv,
                         rms_norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                         max_position_embeddings=params.get("max_seq_len", 4096), tie_word_embeddings=False)
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i, meta in layers.items():
        for name, w in _hf_layer(meta, n_heads, n_kv, f"layers.{i}").items():
            hf[f"model.layers.{i}.{name}"] = w
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in hf.items()}, strict=True, assign=True)
    model.eval()
    heads_cfg = HeadsConfig(backbone=str(out / "backbone"), n_heads=max(0, n_future - 1), kind="transformer",
                            tap=f"layer:{len(layers) - 1}", init_from_last=False, dtype=dtype,
                            trained_backbone="none",
                            recipe={"converted_from": str(Path(folder).expanduser().resolve()),
                                    "format": "meta-consolidated", "params": params})
    mtp_model = MTPModel(model, heads_cfg)
    head_state = {}
    for j, meta in extra.items():
        for name, w in _hf_layer(meta, n_heads, n_kv, f"extra_heads.{j}").items():
            head_state[f"{j}.body.layer.{name}"] = w.to(torch_dtype)
    missing, unexpected = mtp_model.heads.load_state_dict(head_state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise UserError(f"extra_heads do not map onto Llama layers (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    # everything is built and checked: now write, and a conversion that fails half-way leaves no new backbone/
    fresh = not (out / "backbone").exists()
    with atomic_dir(out / "backbone", replace=True) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    try:
        mtp_model.save_pretrained(out / "heads")
    except BaseException:
        if fresh:
            shutil.rmtree(out / "backbone", ignore_errors=True)
        raise
    return out / "heads"


def export_meta(model, folder: str | Path) -> Path:
    """Write an ``MTPModel`` whose heads follow Meta's layout (Llama backbone, transformer heads on the tap
    ``layer:L-1``) as params.json + consolidated.00.pth: the inverse of :func:`convert_meta`."""
    cfg = model.backbone.config
    n_layers = cfg.num_hidden_layers
    if model.config.kind != "transformer" and model.n_heads > 0 or (
            model.n_heads > 0 and model.config.tap != f"layer:{n_layers - 1}") or cfg.model_type != "llama":
        raise UserError("only Llama models with transformer heads on the trunk output (tap layer:L-1) have "
                        "Meta's layout")
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def meta_layer(hf: dict, prefix: str) -> dict:
        out = {}
        for name, w in hf.items():
            if name not in inverse:
                continue
            key = inverse[name]
            if key == "attention.wq.weight":
                w = unpermute_rotary(w, n_heads)
            elif key == "attention.wk.weight":
                w = unpermute_rotary(w, n_kv)
            out[f"{prefix}.{key}"] = w.detach().clone().contiguous()
        return out

    sd = model.backbone.state_dict()
    state = {"tok_embeddings.weight": sd["model.embed_tokens.weight"].clone(), "norm.weight": sd["model.norm.weight"],
             "output.weight": sd["lm_head.weight"].clone()}
    for i in range(n_layers):
        state.update(meta_layer({k[len(f"model.layers.{i}."):]: v for k, v in sd.items()
                                 if k.startswith(f"model.layers.{i}.")}, f"layers.{i}"))
    for j, head in enumerate(model.heads):
        state.update(meta_layer(dict(head.body.layer.state_dict()), f"extra_heads.{j}"))
    params = {"dim": cfg.hidden_size, "n_layers": n_layers + model.n_heads, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
              "rope_theta": float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]),
              "max_seq_len": cfg.max_position_embeddings, "n_future_tokens": model.n_heads + 1}
    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty: choose another folder")
    with atomic_dir(folder) as tmp:
        write_json(tmp / "params.json", params)
        torch.save(state, tmp / "consolidated.00.pth")
    return folder


# ----------------------------------------------------------------------------- the command (mtp.cli's table)


def convert_command(cfg: ConvertConfig, command: str = "") -> dict:
    heads_dir = convert_meta(cfg.checkpoint, cfg.out, cfg.tokenizer, cfg.dtype, overwrite=cfg.overwrite)
    return {"heads": str(heads_dir), "backbone": str(Path(cfg.out).expanduser().resolve() / "backbone")}


def show_convert(r: dict) -> str:
    return f"heads: {r['heads']}  (backbone: {r['backbone']})"
