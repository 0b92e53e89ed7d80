"""The PyTorch executor: a transformers model's forwards against preallocated slots (:mod:`mtp.decode.slots`).

Each forward writes its keys and values in place at the next free slots of every row, with a mask built from the
rows' slots and the draft's tree (:func:`mtp.model.attention.attention_masks`); the commit moves the accepted
entries to the front with one gather and drops the rest. The tapped hidden states come from forward hooks
registered once per session (:func:`mtp.model.trunk.capture_hidden`). The running batch's slots and cache live in
the decoder's :class:`~mtp.decode.batch.Batch` (``slots``, ``cache``), so rows joining and leaving move them with
the rest of the row's state.
"""

from __future__ import annotations

import contextlib

import torch

from mtp.decode.accept import greedy_tokens
from mtp.decode.executors import Executor
from mtp.decode.slots import Slots, free_memory, kv_bytes
from mtp.errors import UserError
from mtp.hf_compat import first_layers, float32_attention, forward_with_cache
from mtp.model.attention import attention_masks
from mtp.model.trunk import capture_hidden


class TorchExecutor(Executor):
    """``backbone``: a transformers causal LM. ``bucket``: attention reads the used slots rounded up to this many.
    ``invariant_attention``: a bf16 / fp16 backbone's attention per query in float32
    (:func:`mtp.hf_compat.float32_attention`), so a position verified in a tree computes what a one-token decode
    of it computes and greedy picks do not flip."""

    name = "torch"
    supports_early_exit = True

    def __init__(self, backbone, bucket: int = 64, invariant_attention: bool = True):
        self.backbone, self.bucket, self.invariant_attention = backbone, bucket, invariant_attention
        self.config, self.device = backbone.config, backbone.device
        self._taps, self._tapped = None, ()

    @contextlib.contextmanager
    def session(self, taps: tuple[int, ...], every_position: bool = False, states_dtype: torch.dtype | None = None):
        with contextlib.ExitStack() as hooks:
            self._tapped = tuple(taps)
            self._taps = hooks.enter_context(capture_hidden(self.backbone, list(taps))) if taps else {}
            if self.invariant_attention:
                hooks.enter_context(float32_attention(self.backbone))
            try:
                yield self
            finally:
                self._taps, self._tapped = None, ()

    def check_room(self, running, requests, total: int, capacity: int) -> None:
        """Rows whose KV cache would not fit in the device's free memory are refused."""
        slots = max(capacity, running.slots.capacity if running.slots is not None else 0)
        need, free = kv_bytes(self.config, self.backbone.dtype, total, slots), free_memory(self.device)
        if free is not None and need > 0.8 * free:
            longest = max(len(r.context) for r in requests)
            raise UserError(f"{total} prompt(s) of up to {longest} tokens + {max(r.max_new_tokens for r in requests)} "
                            f"new tokens need {need / 2**30:.1f} GiB of KV cache, {free / 2**30:.1f} GiB of "
                            f"{self.device.type} memory is free: decode fewer prompts at once or fewer new tokens")

    def forward(self, batch, ids, q_pos, allowed_new, logits_to_keep: int = 0, states: bool = True):
        """(B, Q) new tokens against ``batch``'s cache, written at the next free slots (the caller keeps or drops
        them): logits and, where taps are registered and ``states``, the tapped states of the new tokens."""
        allowed, k_pos = batch.slots.begin(q_pos, allowed_new)
        mask = None if allowed is None else attention_masks(self.config, allowed, q_pos, k_pos, self.backbone.dtype)
        self._taps.clear()
        out = forward_with_cache(self.backbone, batch.cache, input_ids=ids, position_ids=q_pos, attention_mask=mask,
                                 use_cache=True, logits_to_keep=logits_to_keep)
        tapped = [self._taps[i] for i in self._tapped] if states and self._tapped else None
        return out.logits, tapped

    def prefill(self, batch, ids, pos, valid, capacity: int, requests):
        longest, dev = ids.shape[1], self.device
        if bool(valid.all()):  # no padding: the model's own causal attention
            allowed = None
        else:
            causal = torch.ones(longest, longest, dtype=torch.bool, device=dev).tril()
            allowed = (causal[None] & valid[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=dev)[None]
        batch.slots = Slots(ids.shape[0], dev, capacity, bucket=self.bucket)
        batch.cache = batch.slots.cache()  # full layers: sliding windows come from our masks
        logits, states = self.forward(batch, ids, pos, allowed, logits_to_keep=1)
        batch.slots.keep_all(valid)
        return logits, states

    def verify(self, batch, q_tokens, q_pos, allowed_new, draft):
        return self.forward(batch, q_tokens, q_pos, allowed_new)

    def commit(self, batch, keep_idx, keep_valid, lengths: list[int]) -> None:
        batch.slots.keep(keep_idx, keep_valid)

    def join(self, batch, new) -> None:
        batch.slots.extend(new.slots)  # the cache keeps reading the grown slots

    def select(self, batch, index, keep: list[int]) -> None:
        batch.slots.select(index)

    def shallow_chain(self, batch, layers: int, length: int) -> torch.Tensor:
        """The cache is restored afterwards (only the first ``layers`` layers' entries grew)."""
        s = batch.slots.end
        tok, p = batch.root, batch.next_pos
        out = []
        eye = torch.ones(len(batch), 1, 1, dtype=torch.bool, device=self.device)
        try:
            with first_layers(self.backbone, layers):
                for _ in range(length):
                    logits, _ = self.forward(batch, tok[:, None], p[:, None], eye, states=False)
                    batch.slots.keep_all(eye[:, 0])
                    tok = greedy_tokens(logits[:, -1])
                    out.append(tok)
                    p = p + 1
        finally:
            batch.slots.truncate(s)
        return torch.stack(out, 1)
