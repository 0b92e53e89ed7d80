"""Heads and the model that carries them on a backbone. Importing the package registers every head kind
(:mod:`mtp.model.registry`): the per-position kinds of :mod:`mtp.model.heads` and :mod:`mtp.model.eagle3`'s drafter."""

from mtp.model import eagle3, heads  # noqa: F401  (each registers its kinds)
from mtp.model.registry import HEAD_KINDS, register_head  # noqa: F401
