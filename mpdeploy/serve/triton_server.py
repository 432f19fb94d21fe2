"""Start a real Triton Inference Server on loopback for a smoke test of a shipped model repository.

The server binary comes from `nvidia-pytriton`, which carries `tritonserver` with the Python backend
(no TensorRT or ONNX Runtime backends). What it needs to run outside PyTriton, found by trial:

- `LD_LIBRARY_PATH` including the wheel's `nvidia_pytriton.libs/` (the binary's vendored libraries);
- a `--backend-directory` whose `python/` folder holds `libtriton_python.so`, the backend's utils and the
  `triton_python_backend_stub` built for the Python version that will run the model (the wheel keeps
  one stub per version elsewhere, so we assemble that folder in a temp dir);
- models' `EXECUTION_ENV_PATH` pointing at a Python environment (see `mpdeploy.serve.ship`).

Only 127.0.0.1 is bound; the server is always stopped (and its process group killed) on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mpdeploy.core.errors import MpdeployError
from mpdeploy.serve.triton_guard import http_front

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install nvidia-pytriton (or mpdeploy[serve])"
# Header that unlocks HTTP inference when it is restricted (see run_tritonserver's open_http_inference).
HTTP_INFER_HEADER = "mpdeploy-infer-key"


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a `tritonserver` install are."""

    binary: Path
    lib_dir: Path | None  # prepended to LD_LIBRARY_PATH; None for a system install that needs none
    backend_dir: Path  # holds python/libtriton_python.so
    stubs_dir: Path | None  # pytriton layout: <stubs_dir>/<major.minor>/triton_python_backend_stub

    def stub_for(self, python_version: str) -> Path:
        """The Python backend stub for `python_version` ("3.11")."""
        candidates = []
        if self.stubs_dir is not None:
            candidates.append(self.stubs_dir / python_version / "triton_python_backend_stub")
        candidates.append(self.backend_dir / "python" / "triton_python_backend_stub")
        for stub in candidates:
            if stub.is_file():
                return stub
        raise MpdeployError(
            f"no Triton Python backend stub for Python {python_version} (looked in "
            f"{', '.join(str(c) for c in candidates)}); use a Python version the installed "
            f"nvidia-pytriton ships a stub for, or build the stub for this one"
        )


def locate_tritonserver() -> TritonInstall:
    """Find the `tritonserver` carried by the `nvidia-pytriton` wheel, else one on PATH."""
    # find_spec does not import pytriton (which pulls in a lot); we only need its folder.
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(list(spec.submodule_search_locations)[0])
        dist = pkg / "tritonserver"
        binary = dist / "bin" / "tritonserver"
        if binary.is_file():
            lib_dir = pkg.parent / "nvidia_pytriton.libs"
            if not lib_dir.is_dir():  # editable installs keep the libs inside the package
                lib_dir = dist / "external_libs"
            return TritonInstall(
                binary=binary,
                lib_dir=lib_dir if lib_dir.is_dir() else None,
                backend_dir=dist / "backends",
                stubs_dir=dist / "python_backend_stubs",
            )
    # A regular Triton install (e.g. the NGC container: /opt/tritonserver).
    on_path = shutil.which("tritonserver")
    if on_path:
        root = Path(on_path).resolve().parent.parent
        backend_dir = root / "backends"
        if (backend_dir / "python" / "libtriton_python.so").is_file():
            return TritonInstall(binary=Path(on_path), lib_dir=None, backend_dir=backend_dir, stubs_dir=None)
    raise MpdeployError(f"no tritonserver binary found; {_INSTALL_HINT}, or put Triton's tritonserver on PATH")


@dataclass(frozen=True)
class ServerHandle:
    """A running server: `url` is the HTTP endpoint ("127.0.0.1:PORT", as tritonclient wants it)."""

    url: str  # the HTTP front (triton_guard): checks declared shapes, then forwards to Triton
    grpc_url: str
    process: subprocess.Popen
    log_path: Path
    http_header_items: tuple[tuple[str, str], ...] = ()
    triton_http_url: str = ""  # Triton's own HTTP port: inference there needs the key only the front holds

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP inference request must carry: none, the front adds the key (kept for callers
        written against the older launcher). A new dict each time: tritonclient adds its own to it."""
        return dict(self.http_header_items)


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_backend_dir(install: TritonInstall, root: Path, python_version: str) -> Path:
    """backends/python/ = the install's python backend files + the stub for `python_version`."""
    backends = root / "backends"
    src = install.backend_dir / "python"
    dst = backends / "python"
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "__pycache__":
            (dst / item.name).symlink_to(item.resolve())
    stub = dst / "triton_python_backend_stub"
    if not stub.exists():
        stub.symlink_to(install.stub_for(python_version).resolve())
    return backends


def _log_excerpt(path: Path, max_lines: int = 20, max_chars: int = 4000) -> str:
    """The server's error lines plus the last lines of its log, without the wide status tables."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in lines if re.match(r"^E\d{4} ", line)]  # glog severity E
    tail = [line for line in lines if line.strip() and not line.startswith(("|", "+"))][-max_lines:]
    picked = list(dict.fromkeys(errors[-max_lines:] + tail))  # ordered, de-duplicated
    return "\n".join(picked)[-max_chars:]


def _is_ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server (it unloads models and stops its stubs), then kill its process group."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("tritonserver (pid %d) did not stop in %.0f s; killing it", process.pid, grace)
    # The server was started in its own session, so its pgid is its pid; this reaches stubs it left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _server_command(
    install: TritonInstall,
    repo: Path,
    backends: Path,
    model_control_mode: str,
    http_port: int,
    grpc_port: int,
    metrics: bool,
    http_infer_token: str | None,
) -> list[str]:
    """tritonserver argv bound to 127.0.0.1 only."""
    cmd = [
        str(install.binary),
        f"--model-repository={repo.resolve()}",
        f"--backend-directory={backends}",
        f"--model-control-mode={model_control_mode}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--exit-timeout-secs=5",
    ]
    if http_infer_token is not None:
        # Triton 2.51's HTTP/JSON parser allocates the byte size a request *declares* before any check:
        # one request with shape [8,1,32000000,32000000] throws std::bad_alloc and aborts the server
        # (docs/ship.md). Binary-body HTTP and gRPC requests are checked against the config first. So
        # HTTP inference answers only requests carrying a per-run secret header, which only mpdeploy's
        # HTTP front holds (triton_guard.py: it refuses huge declared shapes, then adds the header).
        cmd.append(f"--http-restricted-api=inference:{HTTP_INFER_HEADER}={http_infer_token}")
    if metrics:
        cmd += ["--allow-metrics=true", "--metrics-address=127.0.0.1", f"--metrics-port={free_port()}"]
    else:
        cmd += ["--allow-metrics=false"]
    return cmd


@contextlib.contextmanager
def run_tritonserver(
    repo: Path,
    *,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics: bool = False,
    timeout: float = 60.0,
    model_control_mode: str = "none",
    load_models: tuple[str, ...] = (),
    log_path: Path | None = None,
    python_version: str | None = None,
    install: TritonInstall | None = None,
    open_http_inference: bool = False,
    extra_args: tuple[str, ...] = (),
) -> Iterator[ServerHandle]:
    """Run `tritonserver` on `repo` bound to 127.0.0.1 until the block exits.

    Waits (at most `timeout` seconds) for /v2/health/ready, which with the default strict readiness
    means every model loaded. On failure raises MpdeployError carrying the tail of the server log.
    `python_version` picks the backend stub (default: this interpreter's, which should match the
    models' EXECUTION_ENV_PATH environment). `ServerHandle.url` is mpdeploy's HTTP front, which refuses
    an inference request declaring more elements than the model's config states and forwards the rest
    with the per-run key Triton's HTTP inference requires (see `_server_command` for why);
    `open_http_inference` drops key and front. `extra_args` go to tritonserver as they are.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise MpdeployError(f"model repository {repo} is not a directory; pass the folder `mpdeploy ship --repo` wrote")
    install = install or locate_tritonserver()
    python_version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    http_port = http_port or free_port()
    grpc_port = grpc_port or free_port()

    with tempfile.TemporaryDirectory(prefix="mpdeploy-triton-") as tmp:
        tmp_path = Path(tmp)
        backends = _prepare_backend_dir(install, tmp_path, python_version)
        log_path = Path(log_path) if log_path else tmp_path / "tritonserver.log"
        token = None if open_http_inference else secrets.token_hex(16)
        cmd = _server_command(install, repo, backends, model_control_mode, http_port, grpc_port, metrics, token)
        cmd += [f"--load-model={m}" for m in load_models]
        cmd += list(extra_args)

        env = dict(os.environ)
        if install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(install.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p
            )
        # The backend starts stubs with this PATH; put the running interpreter's bin first.
        env["PATH"] = os.pathsep.join((str(Path(sys.prefix) / "bin"), env.get("PATH", "")))
        logger.info("starting %s", " ".join(cmd).replace(token or "\0", "***"))

        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + timeout
            while not _is_ready(http_port):
                if process.poll() is not None:
                    raise MpdeployError(
                        f"tritonserver exited with code {process.returncode} before it was ready; "
                        f"fix the model repository {repo} (log tail below)\n{_log_excerpt(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise MpdeployError(
                        f"tritonserver not ready after {timeout:.0f} s; raise the timeout or check the "
                        f"models in {repo} (log tail below)\n{_log_excerpt(log_path)}"
                    )
                time.sleep(0.25)
            logger.info("tritonserver ready on 127.0.0.1:%d (pid %d)", http_port, process.pid)
            front = http_front(http_port, (HTTP_INFER_HEADER, token) if token else None, repo) if token \
                else contextlib.nullcontext(http_port)
            with front as front_port:
                yield ServerHandle(
                    url=f"127.0.0.1:{front_port}",
                    grpc_url=f"127.0.0.1:{grpc_port}",
                    process=process,
                    log_path=log_path,
                    triton_http_url=f"127.0.0.1:{http_port}",
                )
        finally:
            _stop(process)
