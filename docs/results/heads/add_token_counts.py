"""Give heads trained before `mtp train` saved token counts the counts of their training data.

    python docs/results/heads/add_token_counts.py HEADS_DIR DATA [DATA ...]

DATA as given to `mtp train --data` (the recipe in HEADS_DIR/config.json names them). The heads are
rewritten in their saved dtype, unchanged; accuracy.json is kept.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from mtp.backbones import DTYPES
from mtp.data import packed_blocks, target_counts
from mtp.model.mtp import MTPModel


def main(folder: Path, data: list[str]) -> None:
    meta = json.loads((folder / "config.json").read_text())
    model = MTPModel.from_pretrained(folder)
    from mtp.backbones import load_backbone

    _, tokenizer = load_backbone(meta["backbone"])
    blocks, masks = packed_blocks(data, tokenizer, meta["recipe"]["seq_len"])
    vocab = model.backbone.get_output_embeddings().weight.shape[0]
    model.token_counts = target_counts(blocks, None if masks.all() else masks, vocab)
    with tempfile.TemporaryDirectory() as keep:
        extra = [p for p in folder.iterdir() if p.name not in ("config.json", "model.safetensors")]
        for p in extra:
            shutil.copy2(p, keep)
        save_dtype = meta.get("recipe", {}).get("save_dtype")
        model.save_pretrained(folder, dtype=DTYPES[save_dtype] if save_dtype else None)
        for p in extra:
            shutil.copy2(Path(keep) / p.name, folder / p.name)
    seen = int((model.token_counts > 0).sum())
    print(f"{folder}: token counts of {int(model.token_counts.sum())} targets ({seen} distinct tokens) added")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
