"""One TorchServe instance as a child process group, with its state in ``state_dir``.

TorchServe keeps per-instance state in odd places: ``key_file.json`` and ``logs/`` in its
current working directory, its pid file in ``$TMPDIR``, and its workers' unix sockets
(``.ts.sock.<port>``) in ``java.io.tmpdir``. Each instance therefore runs with its state
directory as working directory and ``<state>/tmp`` as every kind of temporary directory,
so several instances (tests, other checkouts) can run on one machine.

TorchServe's launcher runs as ``python -m service.serving.torchserve.launch``: the
``torchserve`` command's own code, which then ends as its Java frontend ended (exit code,
or killed by the same signal), so :attr:`TorchServeProcess.returncode` says how the
frontend ended (the ``torchserve`` command exits 0 whatever happened to it).

``torchserve --stop`` finds the server through the pid file in the *caller's* TMPDIR and
is unreliable here; :meth:`TorchServeProcess.stop` signals the process group instead
(SIGTERM, then SIGKILL), and checks that no process of the group (frontend, workers)
survives.

TorchServe's REST inference API listens on loopback (``ts_inference_port``); the public
REST port is the nginx proxy (:mod:`service.serving.torchserve.proxy`), which checks the operator's
API token. It starts once TorchServe is up and stops before it; :meth:`renew_token`
hands it TorchServe's renewed inference key. When TorchServe is started again while the
proxy runs (a restart after the frontend died: ``stop(keep_proxy=True)``, then
:meth:`TorchServeProcess.start`), the proxy stays up, answering 503 meanwhile, and gets the
new TorchServe's inference key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service.auth import ApiToken, load_token, scrubbed_env
from service.environ import TORCH_THREADS_ENV
from service.errors import FailedPrecondition, Unavailable
from service.metrics import MULTIPROC_ENV
from service.serving.torchserve.config import render_config_properties
from service.serving.torchserve.proxy import NginxProxy
from service.serving.settings import ServeSettings

log = logging.getLogger(__name__)

#: Longest unix socket path Linux accepts is 107 bytes; keep a margin for the port.
_MAX_SOCKET_DIR = 90
#: Environment variable the handler reads to call ``torch.set_num_threads``.


@dataclass(frozen=True)
class TorchServeTokens:
    """The keys of ``key_file.json``: ``Authorization: Bearer <key>``."""

    inference: str
    management: str
    api: str


def torch_threads_for(total_workers: int, cpus: int | None = None) -> int:
    """Intra-op threads per worker so that all workers together use each core once."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, total_workers))


class TorchServeProcess:
    """Start and stop one TorchServe; read its keys and addresses.

    ``total_workers`` sizes ``MODELCTL_TORCH_THREADS`` (inherited by every worker);
    by default it is the number of archives in the store times ``workers_per_model``.
    ``torchserve_bin``: a launcher to run instead of TorchServe's own (tests).
    """

    def __init__(self, settings: ServeSettings, *, total_workers: int | None = None,
                 torchserve_bin: str | os.PathLike | None = None,
                 api_token: ApiToken | None = None):
        self.settings = settings
        self._total_workers = total_workers
        self._bin = Path(torchserve_bin) if torchserve_bin else None
        if self._bin is None:
            _require_torchserve()
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        #: The operator's token the REST proxy checks (default: service.auth.load_token).
        self.api_token = api_token
        self.proxy: NginxProxy | None = None

    # -- locations ----------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def config_path(self) -> Path:
        return self.state_dir / "config.properties"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "torchserve.log"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "key_file.json"

    @property
    def metrics_dir(self) -> Path:
        """PROMETHEUS_MULTIPROC_DIR of the workers, wiped at every start."""
        return self.state_dir / "prometheus"

    @property
    def tmp_dir(self) -> Path:
        """TMPDIR / TEMP / java.io.tmpdir of the instance (pid file, worker sockets).

        ``<state>/tmp`` unless that is too long for a unix socket path; then a short
        directory under the system temp dir, derived from the state dir.
        """
        tmp = self.state_dir / "tmp"
        if len(str(tmp)) <= _MAX_SOCKET_DIR:
            return tmp
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"modelctl-{digest}"

    @property
    def inference_url(self) -> str:
        """The public REST endpoint: the proxy, which wants the operator's API token."""
        return _url(_connect_host(self.settings.host), self.settings.inference_port)

    @property
    def ts_inference_url(self) -> str:
        """TorchServe's own REST inference API (loopback; wants TorchServe's inference key)."""
        return _url("127.0.0.1", self.settings.ts_inference_port)

    @property
    def management_url(self) -> str:
        return _url("127.0.0.1", self.settings.management_port)

    @property
    def metrics_url(self) -> str:
        return _url(_connect_host(self.settings.host), self.settings.metrics_port)

    @property
    def grpc_inference_target(self) -> str:
        """TorchServe's own gRPC inference API (loopback; the gateway's upstream)."""
        return f"127.0.0.1:{self.settings.ts_grpc_inference_port}"

    # -- state ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the ``torchserve`` launcher (leader of the process group)."""
        return self._proc.pid if self._proc else None

    @property
    def frontend_pid(self) -> int | None:
        """Pid of the Java frontend, from TorchServe's pid file."""
        try:
            return int((self.tmp_dir / ".model_server.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the launcher ended, which is how the Java frontend ended (the exit code, or
        minus the signal; service/serving/torchserve/launch.py); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    @property
    def tokens(self) -> TorchServeTokens:
        """Current keys, read from ``key_file.json`` (they change when renewed)."""
        try:
            data = json.loads(self.key_file.read_text())
            return TorchServeTokens(
                inference=data["inference"]["key"],
                management=data["management"]["key"],
                api=data["API"]["key"],
            )
        except FileNotFoundError:
            raise FailedPrecondition(f"no TorchServe key file at {self.key_file}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise Unavailable(f"unreadable TorchServe key file {self.key_file}: {exc}") from None

    def inference_key(self) -> str:
        """TorchServe's current inference key; the file is parsed again only when it changed
        (the gateway asks on every call)."""
        try:
            st = self.key_file.stat()
        except FileNotFoundError:
            raise FailedPrecondition(f"no TorchServe key file at {self.key_file}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = getattr(self, "_key_cache", None)
        if cached is None or cached[0] != stamp:
            cached = self._key_cache = (stamp, self.tokens.inference)
        return cached[1]

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_s: float | None = None) -> "TorchServeProcess":
        """Write the config, launch TorchServe, wait for its management API and keys.

        Raises Unavailable (with the end of ``torchserve.log``) if TorchServe exits or is
        not up within ``timeout_s`` (default ``settings.startup_timeout_s``).
        """
        if self.running():
            return self
        s = self.settings
        timeout_s = s.startup_timeout_s if timeout_s is None else timeout_s
        if not s.model_store.is_dir():
            raise FailedPrecondition(f"model store {s.model_store} is not a directory")
        keep_proxy = self.proxy is not None and self.proxy.running()
        for port_name in ("inference_port", "ts_inference_port", "management_port",
                          "metrics_port", "grpc_management_port", "ts_grpc_inference_port"):
            if port_name == "inference_port" and keep_proxy:
                continue  # our own proxy holds it, and stays
            port = getattr(s, port_name)
            host = "127.0.0.1" if port_name in ("ts_inference_port", "management_port",
                                                "grpc_management_port",
                                                "ts_grpc_inference_port") else s.host
            if not _port_free(host, port):
                raise Unavailable(f"{port_name} {port} on {host} is already in use")

        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:  # TorchServe's keys and the proxy's config are in here: the owner's only
            self.state_dir.chmod(0o700)
        except PermissionError:
            log.warning("cannot make the state dir %s private (mode 0700); TorchServe's keys "
                        "are in it", self.state_dir)
        if self.api_token is None:
            self.api_token = load_token(self.state_dir, create=True)
        if not keep_proxy:
            self.proxy = NginxProxy(s, self.api_token)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        s.archive_dir.mkdir(parents=True, exist_ok=True)
        for stale in s.archive_dir.iterdir():  # links (and copies) of an earlier run
            if stale.is_symlink() or (stale.is_file() and stale.suffix == ".mar"):
                stale.unlink()
        # Metric files of an earlier run's workers would be merged into this run's.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        # Keys of an earlier run would look like this run's: TorchServe writes new ones.
        self.key_file.unlink(missing_ok=True)
        self.config_path.write_text(render_config_properties(s))

        env = self._child_env()
        launcher = [str(self._bin)] if self._bin else [sys.executable, "-m",
                                                        "service.serving.torchserve.launch"]
        cmd = [*launcher, "--start", "--foreground", "--ncs",
               "--ts-config", str(self.config_path), "--model-store", str(s.archive_dir)]
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(
            f"\n===== modelctl: starting TorchServe at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(cmd)}\n".encode()
        )
        self._log_file.flush()
        log.info("starting TorchServe (state %s, log %s)", self.state_dir, self.log_path)
        self._proc = subprocess.Popen(
            cmd, cwd=self.state_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals all of it
        )
        try:
            self._wait_up(timeout_s)
            if keep_proxy:  # the running proxy forwards with the new TorchServe's key
                self.proxy.set_upstream_key(self.tokens.inference)
            else:
                self.proxy.start(self.tokens.inference)
        except BaseException:
            self.stop(timeout=5, keep_proxy=keep_proxy)
            raise
        return self

    def _child_env(self) -> dict[str, str]:
        env = scrubbed_env(os.environ)  # the workers never see the operator's token
        # The launcher prefers TS_CONFIG_FILE over --ts-config: never inherit one.
        env.pop("TS_CONFIG_FILE", None)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # workers use this python
        tmp = str(self.tmp_dir)
        env["TMPDIR"] = env["TEMP"] = env["TMP"] = tmp  # pid file, java.io.tmpdir
        env[MULTIPROC_ENV] = str(self.metrics_dir)  # workers' metrics, merged by the exporter
        if not env.get(TORCH_THREADS_ENV):
            env[TORCH_THREADS_ENV] = str(torch_threads_for(self._count_workers()))
        return env

    def _count_workers(self) -> int:
        if self._total_workers is not None:
            return self._total_workers
        from service.deploy.store_scan import scan_model_store

        archives = sum(len(v) for v in scan_model_store(self.settings.model_store).values())
        return max(1, archives) * self.settings.workers_per_model

    def _wait_up(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise Unavailable(
                    f"TorchServe exited with status {code} while starting; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            if self.key_file.exists():
                try:
                    token = self.tokens.management
                    r = requests.get(f"{self.management_url}/models",
                                     headers={"Authorization": f"Bearer {token}"}, timeout=2)
                    if r.status_code == 200:
                        log.info("TorchServe is up (pid %s, management %s)",
                                 self.pid, self.management_url)
                        return
                    last = f"management API answered {r.status_code}"
                except (requests.RequestException, Unavailable) as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"TorchServe not up after {timeout_s:.0f}s ({last}); "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def group_pids(self) -> list[int]:
        """Live (non-zombie) processes of TorchServe's process group, and their children."""
        if self._proc is None:
            return []
        import psutil

        pgid = self._proc.pid
        found = set()
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(proc.pid) == pgid:
                    found.add(proc.pid)
                    found.update(c.pid for c in proc.children(recursive=True)
                                 if c.status() != psutil.STATUS_ZOMBIE)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return sorted(found)

    def stop(self, timeout: float = 20.0, *, keep_proxy: bool = False) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout`` seconds.

        Returns when no process of the group (launcher, Java frontend, workers) is left.
        ``keep_proxy``: leave the REST proxy running (TorchServe is started again next).
        """
        if self.proxy is not None and not keep_proxy:
            self.proxy.stop()
        if self._proc is None:
            return
        import psutil

        pgid = self._proc.pid
        survivors = set(self.group_pids())
        log.info("stopping TorchServe (pid %s, %d processes)", pgid, len(survivors))
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._proc.poll()
            survivors = {p for p in survivors if _alive(psutil, p)} | set(self.group_pids())
            if not survivors:
                break
            time.sleep(0.1)
        else:
            log.warning("TorchServe did not stop within %.0fs; killing %s", timeout,
                        sorted(survivors))
            _signal_group(pgid, signal.SIGKILL)
            for p in survivors:  # a worker that left the group, however unlikely
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            kill_deadline = time.monotonic() + 10
            while time.monotonic() < kill_deadline and any(_alive(psutil, p)
                                                           for p in survivors):
                time.sleep(0.1)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        left = [p for p in survivors if _alive(psutil, p)]
        if left:
            raise Unavailable(f"TorchServe processes survived SIGKILL: {left}")
        if self.tmp_dir != self.state_dir / "tmp":
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def renew_token(self, kind: str = "management") -> TorchServeTokens:
        """Renew the ``management`` or ``inference`` key with the API key; new keys.

        A new inference key goes to the REST proxy at once (the gateway reads the key file
        on every call), so the operator's token keeps working for every client.
        """
        import requests

        if kind not in ("management", "inference"):
            raise ValueError(kind)
        r = requests.put(f"{self.management_url}/token", params={"type": kind},
                         headers={"Authorization": f"Bearer {self.tokens.api}"}, timeout=10)
        if r.status_code != 200:
            raise Unavailable(f"renewing the {kind} key failed: {r.status_code} {r.text}")
        tokens = self.tokens
        if kind == "inference" and self.proxy is not None and self.proxy.running():
            self.proxy.set_upstream_key(tokens.inference)
        return tokens

    def sync_proxy_key(self) -> bool:
        """Give the proxy TorchServe's current inference key if it has another; True if so."""
        if self.proxy is None or not self.proxy.running():
            return False
        key = self.tokens.inference
        if self.proxy.upstream_key == key:
            return False
        self.proxy.set_upstream_key(key)
        return True

    def __enter__(self) -> "TorchServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _require_torchserve() -> None:
    """TorchServe's launcher (the ``ts`` package) must be importable by this Python."""
    import importlib.util

    if importlib.util.find_spec("ts") is None:
        raise FailedPrecondition("TorchServe (the torchserve package) is not installed")


def _alive(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _connect_host(host: str) -> str:
    """Address a local client uses for a server bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
