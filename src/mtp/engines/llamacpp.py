"""llama.cpp, built from the sources vendored in PyPI's ``llama-cpp-python`` sdist, run as ``llama-server``.

``setup()`` downloads the sdist once with pip (no wheel, no compiler flags of its own), extracts its
``vendor/llama.cpp`` tree into the user cache and builds ``llama-server`` there with cmake + ninja (Release,
native CPU, no network features, shared libraries). The sdist's own ``llama_cpp`` package (llama-cpp-python's
ctypes bindings, exactly matching those sources) is extracted beside it and loads the ``libllama.so`` of that
build: :mod:`mtp.engines.llamacpp_lib` runs models in-process through it. The same tree holds ``convert_hf_to_gguf.py`` and its ``gguf-py``, which
``mtp export --format gguf`` runs. Everything lives under ``$MTP_CACHE/engines/llama.cpp-<version>``;
``MTP_LLAMA_CPP_DIR`` points at another built tree.

The server is a real process: started on a free loopback port, waited for with a time-out, talked to over
HTTP (``/completion`` reports its own timings and draft statistics), and stopped (terminate, then kill).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mtp.engines import patches
from mtp.errors import UserError
from mtp.machine import cpu_signature

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors a llama.cpp with EAGLE-3 (src/models/eagle3.cpp)
SDIST = f"llama-cpp-python=={VERSION}"
# the server, the quantizer for Q4_0 targets and drafts, and the library the Python bindings load
TARGETS = ("llama-server", "llama-quantize", "llama")
CONVERTER_NEEDS = (  # the `engines` extra of pyproject.toml: keep them equal
    "sentencepiece>=0.1.98,<0.3.0", "protobuf>=4.21.0,<5.0.0", "diskcache>=5.6.1")
SETUP_STEP_TIMEOUT = 3600  # seconds per setup step (pip download of the sources, cmake configure, the build)
BUILD_HINT = "build it once with `mtp engines setup llama.cpp` (8–12 min of CPU on 2 cores)"


def root() -> Path:
    from mtp.io import cache_dir

    env = os.environ.get("MTP_LLAMA_CPP_DIR")
    return Path(env).expanduser() if env else cache_dir("engines", f"llama.cpp-{VERSION}")


def source_dir() -> Path:
    return root() / "src"


def bindings_dir() -> Path:
    """Where llama-cpp-python's ``llama_cpp`` package (from the same sdist as the sources) is kept."""
    return root() / "python"


def library_dir() -> Path:
    """Where the build puts ``libllama.so`` and the ggml libraries."""
    return root() / "build" / "bin"


def binary(name: str = "llama-server") -> Path:
    return root() / "build" / "bin" / name


def converter() -> Path:
    """llama.cpp's own HF -> GGUF converter (with its gguf-py beside it)."""
    path = source_dir() / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise UserError(f"llama.cpp's converter is not in {source_dir()}: {BUILD_HINT}")
    missing = converter_missing()
    if missing:
        raise UserError(f"llama.cpp's converter needs {', '.join(missing)} in this Python: "
                        f"pip install {' '.join(repr(n) for n in CONVERTER_NEEDS)}")
    return path


def converter_missing() -> list[str]:
    """The converter's imports that this Python lacks (it fails on them only mid-way otherwise)."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:  # the parent package ("google") is missing
            return True

    return [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"),
                                      ("diskcache", "diskcache")) if absent(module)]


def run_tool(cmd: list, tool: str, what: str, timeout: float, env: dict | None = None) -> None:
    """One of llama.cpp's tools (converter, quantizer), output captured, with a time-out; a failure is one line
    naming the tool, what it worked on and the tool's own last line."""
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{tool} took longer than {timeout:.0f} s on {what}: stopped") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{tool} failed on {what} (exit status {proc.returncode}): {last[0]}")


def convert(args: list, what: str, timeout: float) -> None:
    """Run llama.cpp's converter (its own gguf-py first on the path), offline, with a time-out."""
    script = converter()
    src = script.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    run_tool([sys.executable, script, *args], "llama.cpp's converter", what, timeout, env=env)


def quantize(src: Path, out: Path, kind: str, timeout: float = 1800.0) -> Path:
    """llama.cpp's own quantizer: ``src`` (a 16/32-bit GGUF) to ``out`` of type ``kind`` (e.g. Q4_0)."""
    tool = binary("llama-quantize")
    if not tool.is_file():
        raise UserError(f"llama.cpp's llama-quantize is not built ({tool}): {BUILD_HINT}")
    run_tool([tool, src, out, kind.upper()], "llama-quantize", src.name, timeout)
    return out


def require_server() -> Path:
    path = binary()
    if not path.is_file():
        raise UserError(f"llama.cpp's llama-server is not built ({path}): {BUILD_HINT}")
    return path


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None, quiet: bool = False) -> None:
    print(f"mtp: {what}: {' '.join(cmd)}", file=sys.stderr)
    try:
        subprocess.run(cmd, cwd=cwd, env=env, check=True,
                       stdout=subprocess.DEVNULL if quiet else None, timeout=SETUP_STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what} took more than {SETUP_STEP_TIMEOUT // 60} minutes: stopped") from None
    except FileNotFoundError:
        raise UserError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"{what} failed (exit status {e.returncode}): see the output above") from None


CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DBUILD_SHARED_LIBS=ON")


def build_stamp() -> dict:
    """What a finished build was made from; the same stamp means nothing to rebuild."""
    return {"llama_cpp_python": VERSION, "targets": list(TARGETS), "cmake": list(CMAKE_FLAGS),
            "fixes": patches.fingerprint(), "cpu": cpu_signature()}


def _stamp_path() -> Path:
    return root() / "build" / "mtp-build.json"


def built_stamp() -> dict | None:
    try:
        return json.loads(_stamp_path().read_text())
    except (OSError, ValueError):
        return None


def setup(jobs: int | None = None) -> dict:
    """Fetch the vendored sources (pip), apply mtp's source fixes and build llama-server; returns what was done
    and how long it took. A build whose stamp matches (same sources, fixes, flags and CPU) is reused as is."""

    start = time.time()
    src, build = source_dir(), root() / "build"
    stamp = build_stamp()
    bindings = bindings_dir() / "llama_cpp" / "llama_cpp.py"
    if binary().is_file() and built_stamp() == stamp and not converter_missing() and bindings.is_file():
        return {"root": str(root()), "server": str(binary()), "fetch_seconds": 0.0,
                "total_seconds": round(time.time() - start, 1), "fixes": {}, "reused": True}
    if not (src / "CMakeLists.txt").is_file() or not bindings.is_file():
        _fetch_sources(src, bindings_dir())
    fetched = time.time() - start
    fixes = patches.apply(src)
    for name, state in fixes.items():
        fix = next(f for f in patches.FIXES if f.name == name)
        print(f"mtp: llama.cpp source fix {name} ({fix.reason}): {state}", file=sys.stderr)
    old = built_stamp()
    if old is not None and old.get("cpu") != stamp["cpu"] and build.is_dir():
        # compiler flags say -march=native, which ninja cannot see change: start the build over
        print(f"mtp: llama.cpp was built for another CPU ({old.get('cpu')}); rebuilding for {stamp['cpu']}",
              file=sys.stderr)
        shutil.rmtree(build)
    # the converter's Python needs (besides torch, numpy, transformers, which mtp has): its tokenizer readers
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *CONVERTER_NEEDS],
         "installing what llama.cpp's converter imports", quiet=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], "configuring llama.cpp", quiet=True)
    _stamp_path().unlink(missing_ok=True)  # a build that stops half-way leaves no stamp
    _run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 2)],
         "building llama.cpp", quiet=True)
    require_server()
    _stamp_path().write_text(json.dumps(stamp, indent=1) + "\n")
    return {"root": str(root()), "server": str(binary()), "fetch_seconds": round(fetched, 1),
            "total_seconds": round(time.time() - start, 1), "fixes": fixes, "reused": False}


def _fetch_sources(src: Path, python: Path) -> None:
    """The sdist (pip, no build): its vendored llama.cpp into ``src`` and its ``llama_cpp`` package into
    ``python`` (each only where missing)."""
    from mtp.io import atomic_dir

    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
              "-d", tmp, SDIST], "downloading llama.cpp's sources (the llama-cpp-python sdist)")
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"), None)
        if archive is None:
            raise UserError(f"pip did not download the {SDIST} source archive")
        top = archive.name.removesuffix(".tar.gz")
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for out_dir, prefix, strip in ((src, f"{top}/vendor/llama.cpp/", True),
                                           (python, f"{top}/llama_cpp/", False)):
                if out_dir == src and (src / "CMakeLists.txt").is_file() or \
                        out_dir == python and (python / "llama_cpp" / "llama_cpp.py").is_file():
                    continue
                cut = len(prefix) if strip else len(f"{top}/")
                chosen = [m for m in members if m.name.startswith(prefix) and len(m.name) > cut]
                for m in chosen:
                    m.name = m.name[cut:]
                with atomic_dir(out_dir, replace=out_dir.exists()) as out:
                    tar.extractall(out, members=chosen, filter="data")


def serve_command(target_gguf: str | Path, draft_gguf: str | Path | None = None, draft_max: int = 8,
                  threads: int | None = None, port: int = 8080, extra: list[str] | None = None) -> list[str]:
    """The llama-server command line a user runs to serve ``target_gguf`` with the exported EAGLE-3 draft."""
    cmd = [str(binary()), "-m", str(target_gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "4096"]
    if threads:
        cmd += ["-t", str(threads)]
    if draft_gguf is not None:
        cmd += ["--spec-type", "draft-eagle3", "-md", str(draft_gguf), "--spec-draft-n-max", str(draft_max)]
    return cmd + list(extra or [])


FAULT_SIGNALS = {signal.SIGSEGV: "SIGSEGV", signal.SIGILL: "SIGILL", signal.SIGBUS: "SIGBUS"}
EXTRA_BUFFERS = ("AMX", "CPU_REPACK")  # ggml-cpu's extra buffer types, as llama.cpp's load log names them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(error, prompt: str | list[int]) -> str:
    """One line for a request llama-server answered with a 4xx: which prompt, and llama-server's own reason (for a
    prompt longer than its context: how many tokens against how many cells)."""
    try:
        body = json.loads(error.read() or b"{}").get("error", {})
    except (ValueError, OSError, AttributeError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("message") or error.reason or "refused")[:200]
    counts = ""
    if isinstance(body.get("n_prompt_tokens"), int) and isinstance(body.get("n_ctx"), int):
        counts = f": the prompt is {body['n_prompt_tokens']} tokens, its context {body['n_ctx']}"
    shown = f"{len(prompt)} token ids" if isinstance(prompt, list) else repr(prompt[:60] + ("..." if len(prompt) > 60
                                                                                          else ""))
    return f"llama-server refused the prompt {shown} (HTTP {error.code}): {reason}{counts}"


class Server:
    """A running llama-server; a context manager that always stops it. Every wait has a time-out."""

    def __init__(self, cmd: list[str], port: int, log: Path, start_timeout: float = 300.0):
        self.port, self.log, self.cmd = port, log, list(cmd)
        self.url = f"http://127.0.0.1:{port}"
        self.fallback = None  # why the server runs with --no-repack when mtp added it
        self._start()
        try:
            self._wait_ready(start_timeout)
        except UserError:
            why = self._repack_crash()
            if why is None:
                raise
            # ggml's repacked / AMX kernels crashed while loading (a tree built before the source fix, or a bug
            # of another build): the same binary serves with plain CPU kernels. Say so, keep the crash log.
            crashed = log.with_name(log.stem + ".crashed" + log.suffix)
            log.replace(crashed)
            self.fallback = (f"llama-server crashed while loading ({why}); retrying with --no-repack (plain CPU "
                             f"kernels; crash log: {crashed}); `mtp engines setup llama.cpp` rebuilds with mtp's fixes")
            print(f"mtp: {self.fallback}", file=sys.stderr)
            self.cmd = self.cmd + ["--no-repack"]
            self._start()
            self._wait_ready(start_timeout)

    def _start(self) -> None:
        self._log_file = self.log.open("w")
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as e:
            self._log_file.close()
            raise UserError(f"llama-server did not start ({e})") from None

    def _repack_crash(self) -> str | None:
        """Why a failed start is worth one retry with --no-repack, or None: killed by a fault signal while an
        extra buffer type (AMX, CPU_REPACK) held the weights, and not already without them."""
        code = self.proc.returncode
        if code is None or -code not in FAULT_SIGNALS or {"--no-repack", "-nr"} & set(self.cmd):
            return None
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return None
        buffers = sorted({b for b in EXTRA_BUFFERS if f"{b} model buffer size" in text})
        if not buffers:
            return None
        return f"{FAULT_SIGNALS[-code]} with the weights in {' and '.join(buffers)} buffers"

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise UserError(f"llama-server exited with status {self.proc.returncode} while starting: "
                                f"{self._tail()} (log: {self.log})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"llama-server did not become ready within {timeout:.0f} s (log: {self.log})")

    def complete(self, prompt: str | list[int], n_predict: int, timeout: float = 600.0, **params) -> dict:
        """POST /completion (greedy unless params say otherwise); the server's JSON answer."""
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                "stream": False, "seed": 0, **params}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # the server answered: it refused this request, say which and why
            if e.code >= 500:
                raise UserError(f"llama-server failed on a request (HTTP {e.code}): {self._tail()} "
                                f"(log: {self.log})") from None
            raise UserError(refusal(e, prompt)) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            try:  # a crash closes the socket a moment before the process is reaped
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            alive = self.proc.poll() is None
            raise UserError(f"llama-server {'failed' if alive else 'crashed'} on a request ({e}): "
                            f"{self._tail()} (log: {self.log})") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
