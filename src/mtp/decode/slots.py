"""Per-row KV slots over preallocated caches: the decoding engine's memory layout.

Every row of a batch owns the same slot indices; a slot holds one token's keys and values, its position id
and whether the row uses it (``valid``: left padding and the tail of a shorter accepted path are holes). A
forward of Q new tokens writes slots ``[end, end + Q)`` of every registered cache in place
(:class:`mtp.hf_compat.SlotLayer`), then the caller keeps all of them (:meth:`Slots.keep_all`: prefill, a
committed path), keeps a per-row selection moved to the front with one fixed-width gather
(:meth:`Slots.keep`: the accepted path of a verify step) or drops them later (:meth:`Slots.truncate`: draft
keys). Nothing is concatenated or reallocated per step: attention reads the first slots rounded up to a
``bucket`` (masked where unused), so its cost follows the context, and the tensors grow (copied once) only
when a step would not fit.

Several caches may share one layout (the backbone's layers; transformer heads, one cache each, over the
committed positions): they register with :meth:`Slots.cache` and are grown and compacted together.
"""

from __future__ import annotations

import torch

from mtp.hf_compat import SlotView, slot_cache
from mtp.io import read_proc_kib


def free_memory(device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CUDA: the driver's free memory; CPU: the kernel's
    MemAvailable), or None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return read_proc_kib("/proc/meminfo", "MemAvailable")


def kv_bytes(config, dtype: torch.dtype, batch: int, slots: int) -> int:
    """Bytes of a backbone's keys and values for ``batch`` rows of ``slots`` slots."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * size * batch * slots


class Slots:
    def __init__(self, batch: int, device, capacity: int, bucket: int = 64):
        self.batch, self.device, self.bucket = batch, device, max(1, bucket)
        self.view = SlotView(max(1, capacity))
        self.valid = torch.zeros(batch, self.view.capacity, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, self.view.capacity, dtype=torch.long, device=device)
        self.end = 0  # slots in use
        self._caches = []
        self._open = 0  # slots written by the current step, from self.end

    @property
    def capacity(self) -> int:
        return self.view.capacity

    def cache(self):
        """A new transformers cache over this layout."""
        cache = slot_cache(self.view)
        self._caches.append(cache)
        return cache

    def _layers(self):
        for cache in self._caches:
            yield from cache.layers

    def _grow(self, needed: int) -> None:
        self._resize(max(needed, self.capacity + self.capacity // 2))

    def _resize(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for layer in self._layers():
            layer.grow(capacity)
        for name in ("valid", "pos"):
            old = getattr(self, name)
            new = old.new_zeros(self.batch, capacity)
            new[:, :old.shape[1]] = old
            setattr(self, name, new)
        self.view.capacity = capacity

    def begin(self, q_pos: torch.Tensor, allowed_new: torch.Tensor, base: int | None = None):
        """Open slots ``[end, end + Q)`` for a forward of Q tokens at positions ``q_pos`` (B, Q).

        ``allowed_new`` (B, Q, end + Q - base): what each query sees of slots ``[base, end + Q)`` (default
        ``base = end``: the new tokens only); slots before ``base`` are seen where valid. Returns ``allowed``
        (B, Q, L) and the keys' positions (B, L) over the L slots the attention reads. ``allowed_new=None``
        (only at ``end == 0``, rows without padding): plain causal attention over exactly Q slots, which the
        model masks itself (its causal kernel path skips the masked half); returns (None, None)."""
        b, q = q_pos.shape
        s = self.end
        base = s if base is None else base
        if s + q > self.capacity:
            self._grow(s + q)
        length = min(self.capacity, -(-(s + q) // self.bucket) * self.bucket)
        self.view.start, self.view.length, self._open = s, length, q
        self.pos[:, s:s + q] = q_pos
        if allowed_new is None:  # a causal prefill of an empty layout: the model's own mask, no bucket
            self.view.length = q
            return None, None
        allowed = torch.zeros(b, q, length, dtype=torch.bool, device=self.device)
        allowed[:, :, :base] = self.valid[:, None, :base]
        allowed[:, :, base:s + q] = allowed_new
        return allowed, self.pos[:, :length]

    def keep_all(self, valid: torch.Tensor) -> None:
        """Keep the step's slots; ``valid`` (B, Q) marks the holes."""
        s, q = self.end, self._open
        self.valid[:, s:s + q] = valid
        self.end = s + q

    def keep(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep, per row, the step's slots ``end + index[row]`` (index (B, m), valid (B, m)), moved to
        ``end .. end + m - 1``; drop the rest."""
        s, q, m = self.end, self._open, index.shape[1]
        for layer in self._layers():
            layer.compact(s, q, index)
        self.pos[:, s:s + m] = self.pos[:, s:s + q].gather(1, index)
        self.valid[:, s:s + m] = valid
        self.end = s + m

    def truncate(self, end: int) -> None:
        """Forget every slot from ``end`` on."""
        self.end = min(self.end, end)

    # ------------------------------------------------------------------ rows joining and leaving (serving)

    def extend(self, other: "Slots") -> None:
        """Append ``other``'s rows (a layout with the same caches, e.g. new requests just prefilled) after this
        layout's. Both keep their slots where they are; the shorter one's tail up to the longer one's ``end``
        becomes holes, so no row's keys move."""
        if len(self._caches) != len(other._caches):
            raise ValueError("slot layouts with different caches cannot be joined")
        end = max(self.end, other.end)
        capacity = max(self.capacity, other.capacity)
        self._resize(capacity)
        other._resize(capacity)
        self.valid[:, self.end:end] = False
        other.valid[:, other.end:end] = False
        for mine, theirs in zip(self._caches, other._caches):
            if len(mine.layers) != len(theirs.layers):
                raise ValueError("slot layouts with different layers cannot be joined")
            for a, b in zip(mine.layers, theirs.layers):
                a.extend(b)
        self.valid = torch.cat([self.valid, other.valid])
        self.pos = torch.cat([self.pos, other.pos])
        self.batch += other.batch
        self.end = end

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the rows ``rows`` (1-D, in that order), then :meth:`compact` them."""
        for layer in self._layers():
            layer.select(rows)
        self.valid, self.pos = self.valid.index_select(0, rows), self.pos.index_select(0, rows)
        self.batch = len(rows)
        self.compact()

    def compact(self) -> None:
        """Move every row's used slots to the front (in order) and drop the slots no row uses, so holes left by
        rows that joined at different lengths, or by rows that left, stop costing attention. Attention does not
        depend on slot order: each slot carries its position id, its keys are already rotated."""
        used = self.valid[:, :self.end]
        end = int(used.sum(1).max()) if self.batch else 0
        if end == self.end:
            return
        order = torch.sort((~used).to(torch.uint8), dim=1, stable=True).indices[:, :end]  # (B, end): used first
        for layer in self._layers():
            layer.gather_slots(order)
        self.pos[:, :end] = self.pos.gather(1, order)
        self.valid[:, :end] = used.gather(1, order)
        self.end = end
