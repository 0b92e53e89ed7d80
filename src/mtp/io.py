"""Writing to disk without ever leaving half a result: folders and files appear complete or not at all.

``atomic_dir(final)`` yields a hidden temporary sibling of ``final`` to fill; on success it is renamed into
place (``final`` must not exist or be an empty folder, unless ``replace``: then the old one is moved aside first and removed
only after the new one is in place), on any failure it is removed. ``check_new_output`` refuses, before any
slow work, an output that would destroy something the user has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mtp.errors import UserError


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = False):
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):  # an empty folder the user made for it
            final.rmdir()
        if final.exists() and replace:
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        elif final.exists():
            raise UserError(f"{final} appeared while it was being written: nothing replaced")
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_new_output(path: str | Path, flag: str, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """An output folder or file that may be written: absent, an empty folder, or ``overwrite`` given; never
    one of the ``inputs`` nor inside the installed package. Checked before the work starts."""
    p = Path(path).expanduser()
    resolved = p.resolve()
    for i in inputs:
        if i is not None and Path(i).expanduser().resolve() == resolved:
            raise UserError(f"{flag} {path} is also an input: choose another output")
    package = Path(__file__).resolve().parent
    if resolved == package or package in resolved.parents:
        raise UserError(f"{flag} {path} is inside the installed mtp package: choose another output")
    if p.exists() and not (p.is_dir() and not any(p.iterdir())) and not overwrite:
        raise UserError(f"{flag} {path} already exists: choose another path or pass --overwrite")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write to {parent}")
    return p
