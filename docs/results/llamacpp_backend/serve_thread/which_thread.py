"""Which thread decodes: the same llama.cpp decoder (plain, 128 tokens) on the main thread, then on a second thread
(mode none), or on a thread first and then main (first_thread); t1: torch.set_num_threads(1) in each.

    python docs/results/llamacpp_backend/serve_thread/which_thread.py none|t1|first_thread
"""
import threading, time, sys, os
import torch
from mtp.config import DraftOptions
from mtp.decode.run import load_llama_target, build_llama_decoder
mode = sys.argv[1]
target, tok = load_llama_target("smollm2-135m", "packaged", None, 8192)
dec, _ = build_llama_decoder(target, tok, "plain", DraftOptions())
p = tok("Write a story about a robot. Once upon a time").input_ids
def run(tag):
    if mode == "t1":
        torch.set_num_threads(1)
    r = []
    for _ in range(4):
        out = dec.generate([p], 128, eos_token_ids=[])
        r.append(round(len(out.rows[0].tokens) / out.seconds, 1))
    print(mode, tag, r, flush=True)
if mode == "first_thread":
    t = threading.Thread(target=run, args=("thread",)); t.start(); t.join()
    run("main")
else:
    run("main")
    t = threading.Thread(target=run, args=("thread",)); t.start(); t.join()
