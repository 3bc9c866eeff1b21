"""Finding, starting and stopping a `tritonserver` (`dpa serve`).

Two installations are known:
- the `nvidia-pytriton` wheel in its own virtual environment (it needs numpy < 2; `scripts/setup.sh` makes
  `.venv-triton`, or name one with $DPA_TRITON_ENV): its server binary, its bundled libraries, and the Python
  backend with the stub for the environment's Python. The backend folder is assembled under the dpa cache (the
  wheel keeps the stubs apart), and the environment's `bin` goes first on PATH, which is how the stub finds the
  environment's packages (numpy, onnxruntime, dpa-edge) for the model code;
- a `tritonserver` on PATH (the NGC container: /opt/tritonserver), used as it is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dpa import stop
from dpa.errors import DpaError
from dpa.runtime.engine import default_cache_dir

ENVIRONMENT_VARIABLE = "DPA_TRITON_ENV"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
PROJECT_ENVIRONMENT = Path(__file__).resolve().parents[2] / ".venv-triton"  # scripts/setup.sh makes it


@dataclass(frozen=True)
class Installation:
    """How to start one tritonserver: the binary, its backend folder (None: its default), the environment."""

    binary: Path
    backend_directory: Path | None = None
    cache_directory: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    description: str = ""


def _site_packages(environment: Path) -> Path | None:
    found = sorted(environment.glob("lib/python3.*/site-packages"))
    return found[-1] if found else None


def _wheel_installation(environment: Path) -> Installation | None:
    """The nvidia-pytriton wheel's server in the virtual environment `environment`, or None."""
    site = _site_packages(environment)
    if site is None or not (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return None
    root = site / "pytriton" / "tritonserver"
    python_version = site.parent.name.removeprefix("python")
    stub = root / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise DpaError(f"the nvidia-pytriton wheel in {environment} has no Python-backend stub for Python "
                       f"{python_version}")
    backends = default_cache_dir().parent / "triton-backends" / python_version
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (root / "backends" / "python" / "libtriton_python.so",
                   root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        target = python / source.name
        if not target.is_file() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    base = _base_library_directory(environment)
    library_path = [str(site / "nvidia_pytriton.libs"), base or "", os.environ.get("LD_LIBRARY_PATH", "")]
    return Installation(
        binary=root / "bin" / "tritonserver", backend_directory=backends, cache_directory=root / "caches",
        environment={"LD_LIBRARY_PATH": ":".join(filter(None, library_path)),
                     "PATH": f"{environment / 'bin'}:{os.environ.get('PATH', '')}"},
        description=f"nvidia-pytriton wheel in {environment}",
    )


def _base_library_directory(environment: Path) -> str | None:
    """The folder of the libpython that the environment's interpreter was built with (the stub links it)."""
    try:
        result = subprocess.run([str(environment / "bin" / "python"), "-c",
                                 "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def find_installation(environment: str | os.PathLike | None = None) -> Installation:
    """The server to start: the wheel in `environment` (or $DPA_TRITON_ENV, or the project's .venv-triton), else
    `tritonserver` on PATH; DpaError saying how to get one."""
    candidates = [Path(environment)] if environment else []
    if not candidates and os.environ.get(ENVIRONMENT_VARIABLE):
        candidates.append(Path(os.environ[ENVIRONMENT_VARIABLE]))
    if not candidates:
        candidates.append(PROJECT_ENVIRONMENT)
    for candidate in candidates:
        installation = _wheel_installation(candidate)
        if installation is not None:
            return installation
    binary = shutil.which("tritonserver")
    if binary:
        return Installation(Path(binary), description=f"{binary}")
    raise DpaError(f"no tritonserver found (looked for the nvidia-pytriton wheel in {', '.join(map(str, candidates))} "
                   "and for tritonserver on PATH): run scripts/setup.sh (it makes .venv-triton), or use NVIDIA's "
                   "tritonserver container")


class Server:
    """A running tritonserver on 127.0.0.1 (or `host`), its log in `log_path`. Use as a context manager."""

    def __init__(self, repository: str | os.PathLike, installation: Installation, grpc_port: int, http_port: int,
                 host: str = "127.0.0.1", log_path: str | os.PathLike | None = None):
        repository = Path(repository)
        if not (repository / "dpa" / "config.pbtxt").is_file():
            raise DpaError(f"{repository} is not a repository made by `dpa triton` (no dpa/config.pbtxt)")
        self.repository, self.installation = repository, installation
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.log_path = Path(log_path) if log_path else repository.parent / f"{repository.name}.tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        installation = self.installation
        command = [str(installation.binary), f"--model-repository={self.repository.resolve()}",
                   f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                   f"--http-address={self.host}", f"--http-port={self.http_port}",
                   "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                   "--exit-on-error=true", "--strict-readiness=true", "--model-control-mode=none",
                   "--log-verbose=0", "--exit-timeout-secs=10"]
        if installation.backend_directory is not None:
            command.append(f"--backend-directory={installation.backend_directory}")
            command.append("--pinned-memory-pool-byte-size=0")  # the wheel's server has no GPU here
        if installation.cache_directory is not None:
            command.append(f"--cache-directory={installation.cache_directory}")
        return command

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Start the server and wait until it is ready; seconds it took. DpaError (with the end of its log) when
        it exits or is not ready in time; a stop request (`dpa.stop`) while waiting stops it."""
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.installation.environment},
                                            start_new_session=True)
        try:
            while not self.ready():
                stop.check()
                if self.process.poll() is not None:
                    raise DpaError(f"tritonserver exited with code {self.process.returncode} while starting: "
                                   f"{self.log_tail()}")
                if time.monotonic() - started > timeout_s:
                    raise DpaError(f"tritonserver was not ready after {timeout_s:g} s: {self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/v2/health/ready", timeout=1) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return " | ".join((errors or text)[-lines:]) + f" (log: {self.log_path})"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL to its process group after `timeout_s`; the exit code (None if never started)."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_until_stopped(server: Server, say=print) -> int:
    """`dpa serve`: start, print the address, wait for a signal (or the server's exit), stop; the exit code."""
    seconds = server.start()
    say(f"serving {server.repository} at {server.address} (HTTP {server.http_port}), ready in {seconds:.1f} s; "
        f"{server.installation.description}; log {server.log_path}; Ctrl-C stops it")
    try:
        while server.process is not None and server.process.poll() is None:
            stop.check()
            time.sleep(0.2)
        code = server.process.returncode if server.process is not None else None
        raise DpaError(f"tritonserver exited by itself (code {code}): {server.log_tail()}")
    finally:
        code = server.stop()
        say(f"tritonserver stopped (exit code {code})")
