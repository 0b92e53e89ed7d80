"""Benchmarks, one module each (``mtp bench <name>``): analyze, verify, decode, context, engine, pretrain_step,
train_memory.

Every figure is measured side by side in one run (methods alternate, medians kept) and each result names the
command and the machine that produced it.
"""
