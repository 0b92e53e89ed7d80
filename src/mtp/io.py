"""Everything mtp writes to disk goes through here: files and folders appear complete or not at all.

- ``atomic_file(path)`` yields a temporary sibling of ``path`` (same folder, same suffix, so tools that
  infer a format from the name, such as matplotlib's ``savefig``, still work) to write; on success it is
  made shareable and renamed over ``path`` (the old file stays until the new one is complete), on any
  failure it is removed. ``write_text``, ``write_bytes``, ``write_json`` and ``write_safetensors`` are
  the usual writes on top of it.
- ``atomic_dir(final)`` yields a hidden temporary sibling of ``final`` to fill; on success it is renamed into
  place (``final`` must not exist or be an empty folder, unless ``replace``: then the old one is moved aside
  first and removed only after the new one is in place; or ``keep_existing``: then a ``final`` that another
  process completed meanwhile wins and ours is dropped), on any failure it is removed.
- ``recover_dir(final)``: what a killed ``atomic_dir(final, replace=True)`` left is finished or undone, so
  ``final`` is again the newest complete version; leftover temporary siblings of dead processes are removed.
  A run calls it on its checkpoint and heads before it reads or writes them
  (``mtp.training.train.check_run_folder``).
- ``scratch_dir(near)``: a fresh working folder of this process beside ``near``, removed afterwards.
- ``make_shareable(path)``: the permissions the umask allows (mkstemp and safetensors create 0600).
- ``cache_dir(*parts)``: mtp's user cache, ``$MTP_CACHE``, else ``$XDG_CACHE_HOME/mtp``, else ``~/.cache/mtp``.
- ``check_new_output`` refuses, before any slow work, an output that would destroy something the user has.
- ``append_line(path, line)``: logs (``metrics.jsonl``) grow by appending; a line is one ``write``, not atomic.
- ``complete_lines(path)``: a log cut to its last complete line (what a kill mid-write leaves is dropped).
- ``read_text(path)`` / ``read_json(path)``: a user's file, every way it can be unusable (missing, a folder,
  a pipe or device, unreadable, not UTF-8, not JSON) one line that names it; ``check_readable(path)`` for files
  a library opens; ``parse_json(text, where)`` for JSON that comes from elsewhere (a line, a flag, a request).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mtp.errors import UserError


def make_shareable(path: str | Path) -> None:
    """Give a file we wrote the permissions the umask allows (mkstemp and safetensors create 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def cache_dir(*parts: str) -> Path:
    """mtp's user cache (``$MTP_CACHE``, else ``$XDG_CACHE_HOME/mtp``, else ``~/.cache/mtp``), or a path in it.
    Nothing is created."""
    if os.environ.get("MTP_CACHE"):
        root = Path(os.environ["MTP_CACHE"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtp"
    return root.joinpath(*parts)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` (made shareable),
    on any failure it is removed and ``path`` is left as it was."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    for stale in _dead_temp_files(p):  # what killed writes of this file left
        stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.tmp-{os.getpid()}-", suffix=p.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        make_shareable(tmp)  # results are meant to be shared
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8, written atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    """``obj`` as JSON (``indent`` None: one line), ending in a newline, written atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Tensors as a safetensors file, written atomically and shareable."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path).expanduser()


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log. Not atomic by design: a log grows line by line, and a reader (or a resume)
    keeps the complete lines (``complete_lines``)."""
    with Path(path).open("a") as f:
        f.write(line.rstrip("\n") + "\n")


def complete_lines(path: str | Path, keep=None) -> list[str]:
    """The complete lines of a log (``path`` may be absent: none), after cutting the file to them: a line that a
    kill cut off mid-write has no newline and is dropped, so what is appended next starts on a line of its own.
    ``keep(line) -> bool`` drops the first line it refuses and every line after it as well."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read it ({e.strerror})") from None
    lines = data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        if keep is not None and not keep(line):
            break
        kept.append(line)
    size = sum(len(line.encode()) + 1 for line in kept)
    if size != len(data):
        with p.open("r+b") as f:
            f.truncate(size)
    return kept


def check_readable(path: str | Path, what: str = "file") -> Path:
    """``path`` is a file this process can open for reading (a library reads it next); a UserError otherwise:
    missing, a folder, or unreadable (permissions) is said as such, never as "corrupt"."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    if p.is_dir():
        raise UserError(f"{path} is a directory, not a {what}")
    if not p.is_file():  # a FIFO blocks until a writer comes, /dev/zero never ends
        raise UserError(f"{path} is not a regular file (a pipe, socket or device): save it to a file first")
    try:
        with p.open("rb"):
            pass
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}: check its permissions") from None
    return p


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a user's file; one line naming it for each way it is unusable. A UTF-8 byte order mark at
    its start is dropped (editors on Windows write one; it is no text), as :func:`parse_json` drops one."""
    p = check_readable(path, what)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}: check its permissions") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "convert it to UTF-8") from None


def parse_json(text: str | bytes, where: str, fix: str = "", what: str = "is corrupt: ") -> object:
    """JSON text parsed, every way it can be unreadable one line (``where`` names it, ``what`` says how it is bad,
    ``fix`` ends the message): not JSON, nested too deeply, an integer of more digits than Python converts
    (4300), or a string holding a lone surrogate (a ``\\ud800`` escape: no UTF-8 text, tokenizers reject it).
    A UTF-8 byte order mark at the start is ignored (RFC 8259 allows it), whether ``text`` is bytes or str."""
    end = f": {fix}" if fix else ""
    if isinstance(text, str):
        text = text.removeprefix("\ufeff")  # bytes: json.loads itself reads a BOM as UTF-8
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} {what}not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){end}") from None
    except RecursionError:
        raise UserError(f"{where} {what}JSON nested too deeply{end}") from None
    except UnicodeDecodeError as e:  # bytes
        raise UserError(f"{where} {what}not UTF-8 (byte at offset {e.start}){end}") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise UserError(f"{where} {what}JSON with a number of more than 4300 digits{end}") from None
    if (b"\\u" if isinstance(text, bytes) else "\\u") in text and _lone_surrogate(obj):
        raise UserError(f"{where} {what}JSON with a lone surrogate escape (\\ud800-\\udfff) in a string, "
                        f"which is no text{end}")
    return obj


def _lone_surrogate(obj) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def read_json(path: str | Path, what: str = "file", fix: str = "") -> object:
    """A user's JSON file parsed (any JSON value: the caller checks its shape); ``fix`` ends the message
    when it is not JSON (``parse_json``)."""
    return parse_json(read_text(path, what), str(path), fix)


def _fresh_sibling(final: Path) -> Path:
    """``.NAME.tmp-PID`` beside ``final``, empty (what a crashed run of this process id left is removed)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = False, keep_existing: bool = False):
    final = Path(final)
    tmp = _fresh_sibling(final)
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):  # an empty folder the user made for it
            final.rmdir()
        if final.exists() and replace:
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        elif final.exists() and not keep_existing:
            raise UserError(f"{final} appeared while it was being written: nothing replaced")
        elif not final.exists():
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own id: left by a killed process that had it (a reader runs before any write)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _leftovers(final: Path, kind: str) -> dict[int, Path]:
    """``.NAME.KIND-PID`` folders beside ``final`` by process id (kind: tmp or old)."""
    found = {}
    for p in final.parent.glob(f".{final.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and p.is_dir():
            found[int(pid)] = p
    return found


def _dead_temp_files(path: Path) -> list[Path]:
    """The ``.NAME.tmp-PID-RANDOM.SUFFIX`` files that ``atomic_file(path)`` calls of processes now gone left
    (killed before their rename)."""
    found = []
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        pid = p.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and p.is_file():
            found.append(p)
    return found


def recover_dir(final: str | Path) -> bool:
    """Finish what a killed ``atomic_dir(final, replace=True)`` left, so that ``final`` is the newest complete
    version, and remove the temporary siblings of processes that are gone. Returns whether ``final`` exists.

    atomic_dir's steps and what a kill after each leaves: (1) the new version filled into ``.NAME.tmp-PID``
    (incomplete: removed here); (2) ``final`` moved to ``.NAME.old-PID`` (then the tmp is complete: it is moved
    into place here); (3) the tmp renamed to ``final`` (the old one is removed here)."""
    final = Path(final)
    if not final.parent.is_dir():
        return False
    tmps, olds = _leftovers(final, "tmp"), _leftovers(final, "old")
    if not final.exists():
        for pid, old in olds.items():
            if not _pid_alive(pid):
                tmp = tmps.get(pid)
                os.replace(tmp if tmp is not None and tmp.is_dir() else old, final)  # step 2 done: tmp complete
                break
    for pid, p in [*tmps.items(), *olds.items()]:
        if p.exists() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    return final.exists()


@contextlib.contextmanager
def scratch_dir(near: str | Path):
    """A fresh working folder of this process (``.NAME.tmp-PID`` beside ``near``), removed afterwards."""
    tmp = _fresh_sibling(Path(near))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_input_as_output(path: str | Path, flag: str, inputs=()) -> None:
    """Refuse an output path that is one of the command's ``inputs`` (writing it would destroy what is read)."""
    resolved = Path(path).expanduser().resolve()
    for i in inputs:
        if i is not None and Path(i).expanduser().resolve() == resolved:
            raise UserError(f"{flag} {path} is also an input: choose another output")


def read_proc_kib(path: str, key: str) -> int | None:
    """A ``key:  N kB`` line of a Linux /proc file (e.g. /proc/meminfo MemAvailable, /proc/PID/status VmRSS)
    in bytes, or None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_new_output(path: str | Path, flag: str, overwrite: bool = False, inputs=(),
                     entries: tuple[str, ...] | None = None) -> Path:
    """An output folder or file that may be written: absent, an empty folder, or ``overwrite`` given; never one
    of the ``inputs``, inside one or holding one (with or without ``overwrite``), nor inside the installed
    package. ``overwrite`` replaces only a regular file or a folder: never a device, FIFO or socket, and, where
    ``entries`` names what the command writes into its folder, never a symbolic link nor a folder holding anything
    else (someone's other files). Checked before the work starts; nothing is touched when it refuses."""
    p = Path(path).expanduser()
    try:
        resolved = p.resolve()
        refuse_input_as_output(path, flag, inputs)
        for i in inputs:
            if i is None or not Path(i).expanduser().exists():
                continue
            source = Path(i).expanduser().resolve()
            if source in resolved.parents:
                raise UserError(f"{flag} {path} is inside the input {i}: choose an output outside it")
            if resolved in source.parents:
                raise UserError(f"{flag} {path} holds the input {i}: replacing it would delete the input; choose "
                                "another output")
        package = Path(__file__).resolve().parent
        if resolved == package or package in resolved.parents:
            raise UserError(f"{flag} {path} is inside the installed mtp package: choose another output")
        if p.exists() and not p.is_file() and not p.is_dir():
            raise UserError(f"{flag} {path} is not a regular file or folder (a device, FIFO or socket): give a path "
                            "mtp may create")
        if p.exists() and not (p.is_dir() and not any(p.iterdir())) and not overwrite:
            raise UserError(f"{flag} {path} already exists: choose another path or pass --overwrite")
        if entries is not None and p.is_symlink():
            raise UserError(f"{flag} {path} is a symbolic link: give the folder itself")
        if entries is not None and p.is_dir():
            foreign = sorted(e.name for e in p.iterdir() if e.name not in entries)
            if foreign:
                raise UserError(f"{flag} {path} holds files this command does not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}): --overwrite replaces only an output of "
                                "its own; choose another folder")
    except OSError as e:  # a name too long, a loop of links
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None
    check_writable(p, flag)
    return p


def check_writable(path: str | Path, flag: str) -> None:
    """Whether ``path`` can be created, tried before the work: one empty file made and removed in the nearest
    folder that exists (``os.access`` says yes to root under /proc and /sys, where nothing can be created), and
    every name in the path within the file system's limit."""
    p = Path(path).expanduser()
    try:
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"{flag} {path}: cannot write to {parent}")
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror or e}") from None
    long = next((part for part in p.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise UserError(f"{flag} {path}: a name in it is longer than the file system allows ({limit} bytes)")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".mtp-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write to {parent} ({e.strerror or e})") from None


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as an image file (format from the suffix, png without one), written atomically;
    the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return Path(path).expanduser()
