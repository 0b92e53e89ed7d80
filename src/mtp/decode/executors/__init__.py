"""Executors: how the backbone's forwards run under the decoding loop. One interface, two implementations.

:class:`~mtp.decode.engine.SpeculativeDecoder` owns everything that is the same on every backend (the running
batch, proposers, heads, acceptance, stop rules, continuous batching, the speed guard); an :class:`Executor` owns
the backbone and its KV cache and does five things to them:

- ``prefill``: new rows' prompts into the cache; the last position's logits and the tapped hidden states;
- ``verify``: every row's ``[root] + draft`` (a tree: ``draft.parents``; ``allowed_new``, its ancestor mask) in
  one forward against the cache; logits of every query and the tapped states;
- ``commit``: keep each row's accepted query positions, drop the rest of the step;
- ``join`` / ``select``: rows joining (a prefill's new batch after the running one) and leaving;
- ``check_room``: refuse, in one line, rows that would not fit (or :class:`~mtp.errors.NoRoomYet`: not beside the
  running ones, now).

:class:`~mtp.decode.executors.pytorch.TorchExecutor` runs a transformers model in PyTorch (preallocated slots,
tree masks, hooks for the taps); :class:`~mtp.decode.executors.llamacpp.LlamaCppExecutor` a GGUF in llama.cpp
(every root-to-leaf path a sequence, the states returned with the logits). Heads always run in PyTorch on the
states an executor returns: a list per tapped layer of (B, Q, H) tensors in the heads' dtype.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from mtp.errors import UserError

if TYPE_CHECKING:
    from mtp.decode.batch import Batch
    from mtp.decode.tree import Draft


class Executor:
    """The backbone and its cache under the decoder (see the module's text). ``config`` is the model's Hugging Face
    config, ``device`` where logits and states come back."""

    name = ""
    supports_early_exit = False  # can draft with the backbone's first layers (shallow_chain)

    config = None
    device: torch.device

    @contextlib.contextmanager
    def session(self, taps: tuple[int, ...], every_position: bool = False, states_dtype: torch.dtype | None = None):
        """Within the block forwards return the states of layers ``taps`` (of every prompt position at prefill
        with ``every_position``, else the last one's at least), in ``states_dtype``."""
        raise NotImplementedError
        yield  # pragma: no cover

    def reset(self) -> None:
        """Forget every row (the decoder's batch was dropped)."""

    def check_room(self, running: "Batch", requests: list, total: int, capacity: int) -> None:
        """Refuse rows that would not fit beside the ``running`` batch (``total`` rows in all, ``capacity`` cache
        positions each for the new ones)."""

    def prefill(self, batch: "Batch", ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, capacity: int,
                requests: list):
        """New rows (``batch``: theirs alone), prompts left-padded in ``ids`` (B, L) with ``valid`` and positions
        ``pos``: returns the last position's logits (B, 1, V) and the tapped states (per tap (B, L, H)) or None."""
        raise NotImplementedError

    def fit(self, batch: "Batch", draft: "Draft") -> "Draft":
        """The draft this step verifies: ``draft`` itself, or with nodes the executor cannot verify as asked marked
        as padding (llama.cpp with --bit-exact: none past where its KV view grows)."""
        return draft

    def verify(self, batch: "Batch", q_tokens: torch.Tensor, q_pos: torch.Tensor, allowed_new: torch.Tensor,
               draft: "Draft"):
        """One forward of (B, 1 + N) query tokens at ``q_pos``, node i seeing node j where ``allowed_new[b, i, j]``:
        logits (B, 1 + N, V) and the tapped states (per tap (B, 1 + N, H)) or None."""
        raise NotImplementedError

    def commit(self, batch: "Batch", keep_idx: torch.Tensor, keep_valid: torch.Tensor, lengths: list[int]) -> None:
        """Keep each row's accepted query positions (``keep_idx`` (B, m), root first, ``lengths[b]`` of them)."""
        raise NotImplementedError

    def join(self, batch: "Batch", new: "Batch") -> None:
        """The rows just prefilled (``new``) go on after ``batch``'s, in the cache too."""

    def select(self, batch: "Batch", index: torch.Tensor, keep: list[int]) -> None:
        """Only rows ``keep`` (``index`` on the device) stay in the cache, in that order."""

    def shallow_chain(self, batch: "Batch", layers: int, length: int) -> torch.Tensor:
        """Greedy chain of ``length`` tokens after each row's root from the backbone's first ``layers`` layers."""
        raise UserError("early-exit drafts with the first layers of a PyTorch model: use --backend torch")
