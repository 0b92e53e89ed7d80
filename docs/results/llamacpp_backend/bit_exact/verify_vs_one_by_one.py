# A k-token verify (one llama_decode) against the same k tokens decoded one per decode (plain decoding), after a
# prompt of n tokens: "exact" or the largest logit difference per position.
# usage: python verify_vs_one_by_one.py GGUF N1,N2,...   (e.g. the packaged qwen2.5-coder-0.5b Q4_K_M, 150,300,600,1000)
# With llama.cpp built without the source fix fa-split-kv-every-row (revert it in the source tree and rebuild
# libllama), k = 2, 3 differ from 300 cells on; with it they are exact (results.txt).
import sys

import numpy as np

from mtp.engines.llamacpp_lib import LlamaContext, RowCache

PREFIX = [1, 504, 3326, 28, 253, 1789, 30, 216, 1116, 1093, 11, 314, 17023]
FOLLOW = [88, 400, 401, 402, 403, 404, 405, 406]


def one_by_one(rows, n, toks):
    out = []
    for t in toks:
        s, _ = rows.verify([[t]], [[]], [[]])
        rows.commit({0: [0]})
        out.append(s[0, 0])
    rows.ctx.seq_rm(rows.base[0], n)  # the last cells: the verify below refills them in order
    rows.past[0] = n
    return np.stack(out)


with LlamaContext(sys.argv[1], n_ctx=2048, n_seq=16, n_batch=512, threads=2) as ctx:
    for n in [int(x) for x in sys.argv[2].split(",")]:
        rows = RowCache(ctx)
        rows.add_rows([(PREFIX * 100)[:n]])
        for k in range(2, len(FOLLOW) + 1):
            toks = FOLLOW[:k]
            want = one_by_one(rows, n, toks)
            got, _ = rows.verify([toks], [list(range(-1, k - 2))], [[True] * (k - 1)])
            rows._step = None
            rows.ctx.seq_rm(rows.base[0], n)
            rows.past[0] = n
            d = np.abs(got[0] - want).max(axis=1)
            print(n, k, "exact" if (d == 0).all() else [round(float(x), 3) for x in d])
        rows.keep_rows([])
