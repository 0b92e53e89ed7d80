"""What torch.compile would buy mtp's decoding step on this machine, at best: one forward of Q new tokens
against a 256-token prefix in the engine's preallocated slots, shapes fixed (no recompiles), eager against
torch.compile(backbone), alternating, median of 30. Prints the first call's compile time too.
Run: python docs/results/decoding/compile/compile_gain.py [float32|bfloat16] [Q]"""

import statistics
import sys
import time

import torch

from mtp.decode.run import load_for_decoding
from mtp.decode.slots import Slots
from mtp.hf_compat import forward_with_cache
from mtp.model.attention import attention_masks

DTYPE = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
Q = int(sys.argv[2]) if len(sys.argv) > 2 else 1
torch.set_num_threads(2)
backbone, _, _, _ = load_for_decoding("smollm2-135m", None, DTYPE, "cpu")
slots = Slots(1, backbone.device, 512)
cache = slots.cache()


def forward(model, ids, pos, allowed_new):
    allowed, k_pos = slots.begin(pos, allowed_new)
    mask = attention_masks(backbone.config, allowed, pos, k_pos, backbone.dtype)
    return forward_with_cache(model, cache, input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True)


with torch.inference_mode():
    prefix = torch.randint(3, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
    forward(backbone, prefix, torch.arange(256)[None], torch.ones(1, 256, 256, dtype=torch.bool).tril())
    slots.keep_all(torch.ones(1, 256, dtype=torch.bool))
    ids, pos = torch.full((1, Q), 7), torch.arange(256, 256 + Q)[None]
    tril = torch.ones(1, Q, Q, dtype=torch.bool).tril()
    compiled = torch.compile(backbone)

    def step(model) -> float:
        start = time.perf_counter()
        forward(model, ids, pos, tril)
        slots.truncate(256)
        return time.perf_counter() - start

    first = step(compiled)
    eager, comp = [], []
    for _ in range(30):
        eager.append(step(backbone))
        comp.append(step(compiled))
    e, c = statistics.median(eager) * 1e3, statistics.median(comp) * 1e3
    print(f"{DTYPE} Q={Q}: compile (first call) {first:.1f} s; eager {e:.1f} ms, compiled {c:.1f} ms, gain {e / c:.2f}x")
