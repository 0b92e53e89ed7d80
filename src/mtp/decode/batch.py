"""The running batch of a decoder: every row's state in one object, row-aligned.

A decoder keeps its rows in one :class:`Batch`: the requests and what they emitted, the step's roots and
positions, what the heads computed for the next draft, and the caches that hold per-row state (the backbone's
slots, transformer heads' slots, an EAGLE-3 drafter). Rows join (:meth:`Batch.extend`, a prefill's new rows
after the running ones) and leave (:meth:`Batch.select`, the rows that go on, in order) between steps, as one
operation on one object. The backbone's own cache is the executor's (PyTorch: ``slots`` / ``cache`` here;
llama.cpp: its context, outside): the executor's ``join`` / ``select`` move it along (:mod:`mtp.decode.executors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # types only (Request and RowResult are the engine's, which imports this module)
    from mtp.decode.eagle import EagleDraftState
    from mtp.decode.slots import Slots


@dataclass
class Batch:
    requests: list["Request"] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    results: list["RowResult"] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    root: torch.Tensor | None = None  # (B,) the step's root: the token already certain
    next_pos: torch.Tensor | None = None  # (B,) its position
    root_next: torch.Tensor | None = None  # (B,) eagle3: the token after the last committed position
    head_logits: torch.Tensor | None = None  # (B, n_heads, V) heads' drafts for the next step, once computed
    head_inputs: tuple | None = None  # mlp heads: their inputs ([(B, 1, H) per tap], positions (B, 1)), run lazily
    head_hidden: torch.Tensor | None = None  # transformer heads: their outputs (B, n_heads, H) at the last position
    seq_states: list[torch.Tensor] | None = None  # sequential heads: the tapped states (B, H) they draft from
    slots: Slots | None = None  # the PyTorch backbone's slots and cache (another executor keeps its own)
    cache: object = None
    head_slots: Slots | None = None  # transformer heads' slots and caches
    head_caches: list | None = None
    eagle_state: EagleDraftState | None = None  # an EAGLE-3 drafter's cache and draft nodes

    def __len__(self) -> int:
        return len(self.requests)

    def extend(self, new: Batch) -> None:
        """Append ``new``'s rows (just prefilled) after these; both batches have the same heads. The backbone's
        slots are the executor's to join."""
        self.requests += new.requests
        self.prompts += new.prompts
        self.results += new.results
        self.done += new.done
        self.root, self.next_pos = _cat(self.root, new.root), _cat(self.next_pos, new.next_pos)
        self.root_next = _cat(self.root_next, new.root_next)
        both = self.head_logits is not None and new.head_logits is not None  # else computed again when read
        self.head_logits = torch.cat([self.head_logits, new.head_logits]) if both else None
        self.head_hidden = _cat(self.head_hidden, new.head_hidden)
        if new.head_inputs is not None:
            (mine, my_pos), (theirs, their_pos) = self.head_inputs, new.head_inputs
            self.head_inputs = ([torch.cat([a, b]) for a, b in zip(mine, theirs)], torch.cat([my_pos, their_pos]))
        if new.seq_states is not None:
            self.seq_states = [torch.cat([a, b]) for a, b in zip(self.seq_states, new.seq_states)]
        if new.head_slots is not None:
            self.head_slots.extend(new.head_slots)  # the caches keep reading the grown slots
        if new.eagle_state is not None:
            self.eagle_state.extend(new.eagle_state)

    def select(self, keep: list[int]) -> torch.Tensor:
        """Keep only rows ``keep``, in that order; returns them as an index tensor (for the executor's cache)."""
        self.requests = [self.requests[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]
        self.results = [self.results[i] for i in keep]
        self.done = [self.done[i] for i in keep]
        device = next((t.device for t in (self.root, self.next_pos) if t is not None), torch.device("cpu"))
        index = torch.tensor(keep, dtype=torch.long, device=device)
        self.root, self.next_pos = _pick(self.root, index), _pick(self.next_pos, index)
        self.root_next, self.head_logits = _pick(self.root_next, index), _pick(self.head_logits, index)
        self.head_hidden = _pick(self.head_hidden, index)
        if self.head_inputs is not None:
            states, pos = self.head_inputs
            self.head_inputs = ([t.index_select(0, index) for t in states], pos.index_select(0, index))
        if self.seq_states is not None:
            self.seq_states = [t.index_select(0, index) for t in self.seq_states]
        if self.head_slots is not None:
            self.head_slots.select(index)
        if self.eagle_state is not None:
            self.eagle_state.select(index)
        return index


def _cat(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
    return mine if theirs is None else theirs if mine is None else torch.cat([mine, theirs])


def _pick(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.index_select(0, index)
