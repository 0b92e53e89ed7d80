"""Static draft trees as users write them: paths of ranks, Medusa's notation (``[[0], [0, 0], [1]]``), read from
the command line or a file and checked: no torch here, so a configuration checks ``--tree`` before any model
loads (mtp.decode.tree compiles a checked tree into a step's buffers)."""

from __future__ import annotations

from mtp.errors import UserError
from mtp.io import parse_json, read_text

MAX_TREE_NODES = 4096
"""A static tree has at most this many paths (nodes): far above what pays off (tens), low enough that a
verify forward over it fits in memory."""
MAX_TREE_DEPTH = 64
"""And is at most this deep (the heads it reads; mtp heads number at most 64)."""


def read_tree(spec: str) -> list[tuple[int, ...]]:
    """--tree: inline JSON (it starts with ``[``) or a file holding it; checked by :func:`parse_tree`."""
    if spec.lstrip().startswith("["):
        return parse_tree(spec)
    return parse_tree(read_text(spec, "tree file"), where=f"tree file {spec}")


def parse_tree(spec: str | list, where: str = "tree spec") -> list[tuple[int, ...]]:
    """A tree spec from the command line or a file: JSON-like ``[[0], [0, 0], [1]]`` or a list already; at most
    ``MAX_TREE_NODES`` paths, each of at most ``MAX_TREE_DEPTH`` non-negative integer ranks."""
    example = "e.g. [[0], [0, 0], [1]]"
    if isinstance(spec, str):
        spec = parse_json(spec, where, f"give a list of paths, {example}", what="is ")
    if isinstance(spec, tuple):
        spec = list(spec)
    if not isinstance(spec, list) or not all(isinstance(p, (list, tuple)) for p in spec):
        raise UserError(f"{where} must be a list of paths, each a list of ranks, {example}")
    if len(spec) > MAX_TREE_NODES:
        raise UserError(f"{where} has {len(spec)} paths: a tree has at most {MAX_TREE_NODES} nodes")
    deep = max((len(p) for p in spec), default=0)
    if deep > MAX_TREE_DEPTH:
        raise UserError(f"{where} has a path {deep} ranks deep: a tree is at most {MAX_TREE_DEPTH} deep")
    for p in spec:
        if not p or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
            raise UserError(f"{where}: path {short(p)} must be a non-empty list of non-negative integer ranks")
    return [tuple(p) for p in spec]


def short(path) -> str:
    text = str(list(path))
    return text if len(text) <= 60 else text[:57] + "..."


def check_paths(paths, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """A tree spec's paths, checked (no gaps, no duplicates, at most ``max_depth`` deep), by depth then
    lexicographically (parents before their children)."""
    paths = parse_tree(paths)
    if not paths:
        raise UserError("tree spec has no paths")
    seen = set()
    for p in paths:
        if p in seen:
            raise UserError(f"tree spec lists the path {list(p)} twice")
        seen.add(p)
    for p in paths:
        if len(p) > 1 and p[:-1] not in seen:
            raise UserError(f"tree spec has a gap: path {list(p)} is there but its parent {list(p[:-1])} is not")
    depth = max(len(p) for p in paths)
    if max_depth is not None and depth > max_depth:
        raise UserError(f"tree spec is {depth} deep but there are only {max_depth} heads")
    return sorted(paths, key=lambda p: (len(p), p))
