"""An EAGLE-3 drafter's state while decoding: its own KV cache, its committed slots, and the draft nodes.

The drafter at position p reads the token x_{p+1} and the target's fused state g_p (EAGLE's one-token
shift). After every verify step the engine *commits*: the accepted positions are run through the drafter
with their target states (the last one's token is the new root), extending the committed cache; the output
at the last position drafts depth 1. A deeper node P (depth d - 1, token t) is *expanded* when the
proposer asks for its children: one query with token t, the output of P's parent as hidden state, position
root + d - 1, attending to the committed cache, P's ancestors' draft keys and itself. Nodes are memoized by
their token path below the root, so the proposers' interface (paths in, logits out) is the sequential heads'
one. Draft keys are dropped at the next commit.

Rows of a batch commit different numbers of tokens: unused slots are holes hidden by each row's mask.
"""

from __future__ import annotations

import torch

from mtp.decode.slots import Slots
from mtp.model.attention import additive_mask


class EagleDraftState:
    def __init__(self, mtp_model, batch: int, device, capacity: int = 256, bucket: int = 64):
        self.model, self.head = mtp_model, mtp_model.eagle
        self.slots = Slots(batch, device, capacity, bucket)  # committed slots, then the step's draft keys
        self.cache = self.slots.cache()
        self.committed = 0
        self.device, self.batch = device, batch
        self.root_out: torch.Tensor | None = None  # (B, H): output at the last committed position
        self.root_logits: torch.Tensor | None = None  # (B, Vd)
        self._reset_draft()

    def _reset_draft(self):
        self.memo: list[dict[tuple, tuple[int, torch.Tensor]]] = [{} for _ in range(self.batch)]
        self.logits_memo: list[dict[tuple, torch.Tensor]] = [{} for _ in range(self.batch)]
        self.draft_slots = 0

    def extend(self, other: "EagleDraftState") -> None:
        """Append ``other``'s rows (new requests just prefilled) after this state's, between steps."""
        self.slots.extend(other.slots)
        self.committed = self.slots.end
        for name in ("root_out", "root_pos", "root_logits"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.batch += other.batch
        self._reset_draft()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the rows ``rows`` (1-D), between steps."""
        self.slots.select(rows)
        self.committed = self.slots.end
        for name in ("root_out", "root_pos", "root_logits"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.batch = len(rows)
        self._reset_draft()

    @property
    def dtype(self):
        return self.head.lm_head.weight.dtype

    def commit(self, states: list[torch.Tensor], tokens: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor):
        """Run the drafter over newly committed positions: target states [(B, m, Ht)] at positions ``pos``
        (B, m), each with the token after it (B, m); ``valid`` (B, m) False for holes. Drops draft keys."""
        b, m = tokens.shape
        self.slots.truncate(self.committed)
        self._reset_draft()
        causal = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()[None] & valid[:, None, :]
        causal |= torch.eye(m, dtype=torch.bool, device=self.device)[None]
        allowed, _ = self.slots.begin(pos, causal)
        dtype = self.dtype
        g = self.head.fuse([x.to(dtype) for x in states])
        a = self.head.step(self.model.embed(tokens).to(dtype), g, pos, additive_mask(allowed, dtype), self.cache)
        self.slots.keep_all(valid)
        self.committed = self.slots.end
        rows = torch.arange(b, device=self.device)
        last = (valid.long().cumsum(1) * valid).argmax(1)  # the last valid slot of each row
        out = a[rows, last]  # (B, H)
        if self.root_out is None:
            self.root_out = out
        else:  # rows without a valid slot (finished) keep their state
            self.root_out = torch.where(valid.any(1)[:, None], out, self.root_out)
        used = self.slots.valid[:, :self.committed]
        self.root_pos = self.slots.pos.gather(1, (used.long().cumsum(1) * used).argmax(1)[:, None])[:, 0]
        self.root_logits = self.head.draft_logits(self.root_out)

    def draft_logits(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (B, U, Vd) of the children of U nodes per row, given as token paths
        (B, U, d): the root token, then the node's tokens below the root (d = 1: the root itself)."""
        b, u, d = prev_ids.shape
        if d == 1:
            return self.root_logits[:, None].expand(b, u, -1)
        paths = prev_ids[:, :, 1:].tolist()  # (B, U, d - 1) tokens below the root
        out = torch.empty(b, u, self.root_logits.shape[-1], dtype=self.root_logits.dtype, device=self.device)
        todo = []  # (row, slot u, path) not yet expanded
        for r in range(b):
            for i in range(u):
                key = tuple(paths[r][i])
                hit = self.logits_memo[r].get(key)
                if hit is None:
                    todo.append((r, i, key))
                else:
                    out[r, i] = hit
        if not todo:
            return out
        # one query per (row, node) to expand, laid out (B, W) with W the most any row needs
        per_row: list[list[tuple[int, tuple]]] = [[] for _ in range(b)]
        for r, i, key in todo:
            per_row[r].append((i, key))
        w = max(len(x) for x in per_row)
        h = self.root_out.shape[-1]
        tokens = torch.zeros(b, w, dtype=torch.long)
        hidden = self.root_out.new_zeros(b, w, h)
        qvalid = torch.zeros(b, w, dtype=torch.bool)
        n_draft = self.draft_slots
        anc = torch.zeros(b, w, n_draft + w, dtype=torch.bool)
        for r, items in enumerate(per_row):
            for j, (_, key) in enumerate(items):
                tokens[r, j] = key[-1]
                parent = key[:-1]
                hidden[r, j] = self.root_out[r] if not parent else self.memo[r][parent][1]
                qvalid[r, j] = True
                for n in range(1, len(key)):  # the node's ancestors below the root have draft keys
                    anc[r, j, self.memo[r][key[:n]][0]] = True
                anc[r, j, n_draft + j] = True
        dev = self.device
        tokens, qvalid, anc = tokens.to(dev), qvalid.to(dev), anc.to(dev)
        depth = len(todo[0][2])  # every node of one call is at the same depth
        q_pos = (self.root_pos + depth)[:, None].expand(b, w)
        anc[:, :, -w:] |= torch.eye(w, dtype=torch.bool, device=dev)[None]  # padding queries see themselves
        allowed, _ = self.slots.begin(q_pos, anc, base=self.committed)
        dtype = self.dtype
        a = self.head.step(self.model.embed(tokens).to(dtype), hidden, q_pos, additive_mask(allowed, dtype),
                           self.cache)  # (B, W, H)
        self.slots.keep_all(qvalid)
        logits = self.head.draft_logits(a)  # (B, W, Vd)
        for r, items in enumerate(per_row):
            for j, (i, key) in enumerate(items):
                self.memo[r][key] = (n_draft + j, a[r, j])
                self.logits_memo[r][key] = logits[r, j]
                out[r, i] = logits[r, j]
        self.draft_slots += w
        return out
