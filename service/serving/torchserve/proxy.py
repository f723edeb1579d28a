"""nginx in front of TorchServe's REST inference API: it checks the operator's API token.

TorchServe's own keys are per instance and expire (service/serving/torchserve/process.py), so they
cannot be what clients of a Kubernetes Service send. The public REST port is therefore
nginx (Debian's package, ``scripts/system_deps.sh``), run as a child process with
everything under ``<state_dir>/proxy`` (config, pid, error log, temporary files):

* ``Authorization: Bearer <API token>`` is required for every path (``/ping`` included);
  a missing or wrong one gets 401, ``WWW-Authenticate: Bearer`` and the JSON error body of
  :class:`service.errors.Unauthenticated`;
* a body over ``max_request_size_bytes`` gets 413 (:class:`service.errors.PayloadTooLarge`)
  before anything reaches TorchServe;
* TorchServe not answering gets 503 (:class:`service.errors.Unavailable`);
* at most ``settings.admit_per_model`` requests of one model (``/predictions/<model>[/…]``,
  ``/explanations/…``, ``/v1|v2/models/<model>…``, every version together) are let through
  at once; one more gets 429, ``Retry-After: <retry_after_s>`` and the JSON body of
  :class:`service.errors.ResourceExhausted`, before it reaches TorchServe. TorchServe 0.12
  answers its own full queue with the 503 it gives a model without workers ("has no worker
  to serve inference request", ``ModelManager.addJob`` returning false for both), so
  nothing after it could tell the two apart: the limit is held here, at most half of
  TorchServe's ``job_queue_size`` (the gRPC gateway holds the other half), and its 503 then
  only means "no worker" and passes through. A client that disconnects keeps its place
  until TorchServe has answered (``proxy_ignore_client_abort``): TorchServe runs the
  request anyway, so the count stays that of TorchServe's queue;
* request bodies in flight (every path) stay within REST's half of the replica's byte
  budget (service/serving/torchserve/budget.py): one ``limit_conn`` zone per size class,
  keyed by ``Content-Length`` (a chunked body counts as the largest), so that the admitted
  bodies, each counted at its class's top, never sum to more than the half. One more gets
  the same 429 and ``Retry-After``. ``limit_conn`` runs before nginx reads a body, so a
  refused body is read and discarded, never buffered or sent on; an admitted one is read
  whole before it is sent on (request buffering), in memory up to
  ``client_body_buffer_size`` (1 MiB) and in a temporary file under the state dir above it;
* everything else goes to TorchServe on ``127.0.0.1:<ts_inference_port>``, with the
  caller's Authorization header replaced by TorchServe's current inference key. When
  TorchServe's keys are renewed, :meth:`NginxProxy.set_upstream_key` rewrites that one
  included file and reloads nginx gracefully (requests in flight finish).

:func:`render_nginx_conf` is pure (tests read its text); :class:`NginxProxy` runs it.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from service.atomic import atomic_write
from service.auth import INVALID_MESSAGE, MISSING_MESSAGE, ApiToken
from service.errors import (
    FailedPrecondition,
    PayloadTooLarge,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from service.serving.settings import ServeSettings
from service.serving.torchserve.budget import above_regex, endpoint_shares, size_classes

log = logging.getLogger(__name__)

#: The included file holding TorchServe's current inference key (rewritten on renewal).
UPSTREAM_AUTH_FILE = "upstream_auth.conf"
_SAFE_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")


def nginx_binary() -> Path:
    """nginx from PATH or Debian's /usr/sbin; FailedPrecondition naming the installer."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                      else None)
    if not found:
        raise FailedPrecondition("nginx is not installed: the REST proxy needs it "
                                 "(scripts/system_deps.sh installs Debian's nginx as root)")
    return Path(found)


def _json_body(error) -> str:
    """An error's JSON body as an nginx single-quoted string (no quote, backslash or $)."""
    text = json.dumps(error.to_dict())
    if any(c in text for c in "'\\$"):
        raise ValueError(f"cannot embed {text!r} in nginx's config")
    return f"'{text}'"


def _token_regex(token: ApiToken) -> str:
    """A case-sensitive PCRE for ``Bearer <token>`` with a case-insensitive scheme."""
    scheme = "".join(f"[{c.upper()}{c}]" for c in "bearer")
    return f"^{scheme} +{re.escape(token.value)} *$"


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen_directive(host: str, port: int) -> str:
    # "::" means every address, IPv4 too (as TorchServe's own binding did).
    return _listen(host, port) + (" ipv6only=off" if host == "::" else "")


def _user_directive() -> str:
    """As root, nginx would run its workers as ``nobody``, who cannot enter a private state
    dir: keep them on the current user. (In the image nginx runs as the non-root user.)"""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


#: The request a body-size map looks at: ``<Transfer-Encoding>:<Content-Length>``.
_BODY_KEY = '"$http_transfer_encoding:$content_length"'


def _byte_zones(settings: ServeSettings) -> tuple[str, str]:
    """REST's share of the byte budget as nginx text: ``(maps and zones in http, limit_conn
    lines in server)``; one zone per size class, counting the bodies larger than its lower
    bound, limited to the places of its class and every larger one."""
    share, _ = endpoint_shares(settings)
    maps, limits = [], []
    for c in size_classes(share, settings.max_request_size_bytes):
        var, zone = f"$modelctl_body_over_{c.above}", f"modelctl_bytes_over_{c.above}"
        if c.above == 0:
            maps.append(f"""    # Every request with a body (no Transfer-Encoding and no Content-Length: none).
    map {_BODY_KEY} {var} {{
        default 1;
        ":" "";
    }}""")
        else:
            maps.append(f"""    # Bodies over {c.above} bytes: by Content-Length; a chunked one (Transfer-Encoding) is
    # taken for the largest and counted in every zone.
    map {_BODY_KEY} {var} {{
        default "";
        "~^[^:]" 1;
        "~^:0*{above_regex(c.above)}$" 1;
    }}""")
        maps.append(f"    limit_conn_zone {var} zone={zone}:64k;")
        limits.append(f"        limit_conn {zone} {c.nested_places};  # over {c.above} bytes, up to "
                      f"{c.top}: {c.places} places, and those of the larger classes")
    return "\n".join(maps), "\n".join(limits)


def render_nginx_conf(settings: ServeSettings, token: ApiToken, proxy_dir: Path) -> str:
    """nginx.conf for one instance; TorchServe's key comes from ``UPSTREAM_AUTH_FILE``."""
    s = settings
    d = proxy_dir.as_posix()
    too_large = PayloadTooLarge(f"request body over {s.max_request_size_bytes} bytes "
                                "(max_request_size_bytes)")
    unavailable = Unavailable("TorchServe is not answering behind the proxy")
    share, _ = endpoint_shares(s)
    # nginx cannot say which limit_conn zone refused: one answer names both limits.
    busy = ResourceExhausted(f"too many requests at once: more than {s.admit_per_model} for this "
                             f"model, or more request bodies than the {share} bytes of the "
                             f"byte budget for REST hold (half of max_inflight_bytes, "
                             f"{s.inflight_bytes_budget}); retry after {s.retry_after_s}s")
    byte_maps, byte_limits = _byte_zones(s)
    timeout = s.response_timeout_s + 30
    return f"""\
# nginx.conf generated by `modelctl serve` (service/serving/torchserve/proxy.py); rewritten on every
# start: change ServeSettings / MODELCTL_* variables or the API token, not this file.
# It holds the API token and TorchServe's inference key: mode 0600 in a 0700 directory.
{_user_directive()}daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    # Every temporary path under the state dir: the root file system may be read-only.
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    access_log off;
    server_tokens off;
    # nginx's own answers (401, 413, 503) are JSON; TorchServe's keep their own type.
    default_type application/json;

    # The operator's API token: "Bearer <token>" (any case of the scheme) and nothing else.
    map $http_authorization $modelctl_auth {{
        default invalid;
        "" missing;
        "~{_token_regex(token)}" ok;
    }}

    # The model a request is for (every version together); other paths ("") are not counted.
    map $uri $modelctl_model {{
        default "";
        "~^/(?:predictions|explanations)/([^/]+)" $1;
        "~^/v[12]/models/([^/:]+)" $1;
    }}
    limit_conn_zone $modelctl_model zone=modelctl_models:1m;

    # Request bodies in flight: REST's half of the replica's byte budget, by size class
    # (service/serving/torchserve/budget.py).
{byte_maps}

    upstream torchserve {{
        server 127.0.0.1:{s.ts_inference_port};
        keepalive 32;
    }}

    server {{
        listen {_listen_directive(s.host, s.inference_port)};
        # Bodies over the limit: 413 before anything reaches TorchServe.
        client_max_body_size {s.max_request_size_bytes};
        client_body_buffer_size 1m;
        error_page 413 @too_large;
        error_page 502 504 =503 @unavailable;
        # A model's requests beyond its share of TorchServe's queue, and bodies beyond REST's
        # share of the byte budget: 429, never queued, the body discarded.
        limit_conn modelctl_models {s.admit_per_model};
{byte_limits}
        limit_conn_status 429;
        limit_conn_log_level info;
        error_page 429 @busy;

        location / {{
            if ($modelctl_auth = missing) {{
                add_header WWW-Authenticate 'Bearer realm="modelctl"' always;
                return 401 {_json_body(Unauthenticated(MISSING_MESSAGE))};
            }}
            if ($modelctl_auth = invalid) {{
                add_header WWW-Authenticate 'Bearer realm="modelctl", error="invalid_token"' always;
                return 401 {_json_body(Unauthenticated(INVALID_MESSAGE))};
            }}
            proxy_pass http://torchserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # A kept-alive connection that TorchServe closed meanwhile: send the request
            # once more on a new one (also a POST: a prediction changes nothing).
            proxy_next_upstream error non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # TorchServe's current inference key in place of the caller's token.
            include {d}/{UPSTREAM_AUTH_FILE};
            # Streamed predictions (TorchServe's intermediate responses) pass at once.
            proxy_buffering off;
            # A client that leaves keeps its limit_conn place until TorchServe has
            # answered: TorchServe runs its request anyway.
            proxy_ignore_client_abort on;
            proxy_read_timeout {timeout}s;
            proxy_send_timeout {timeout}s;
        }}

        location @too_large {{
            return 413 {_json_body(too_large)};
        }}

        location @busy {{
            add_header Retry-After {s.retry_after_s} always;
            return 429 {_json_body(busy)};
        }}

        location @unavailable {{
            return 503 {_json_body(unavailable)};
        }}
    }}
}}
"""


def render_upstream_auth(ts_inference_key: str) -> str:
    if not _SAFE_KEY.fullmatch(ts_inference_key):
        raise Unavailable("TorchServe's inference key has unexpected characters")
    return f'proxy_set_header Authorization "Bearer {ts_inference_key}";\n'


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically and durably, mode 0600 (service/atomic.py)."""
    atomic_write(path, text, mode=0o600)


class NginxProxy:
    """One nginx master (and its worker) for one TorchServe instance."""

    def __init__(self, settings: ServeSettings, token: ApiToken, *, nginx_bin: Path | None = None):
        self.settings = settings
        self.token = token
        self._bin = nginx_bin
        self._proc: subprocess.Popen | None = None
        #: TorchServe's inference key in the written config.
        self.upstream_key: str | None = None

    @property
    def dir(self) -> Path:
        return self.settings.state_dir / "proxy"

    @property
    def config_path(self) -> Path:
        return self.dir / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """How the nginx master ended (exit code, or minus the signal); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def _cmd(self, *extra: str) -> list[str]:
        binary = self._bin or nginx_binary()
        return [str(binary), "-p", str(self.dir), "-c", str(self.config_path),
                "-e", str(self.error_log), *extra]

    def write_config(self, ts_inference_key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "tmp").mkdir(exist_ok=True)
        _write_private(self.dir / UPSTREAM_AUTH_FILE, render_upstream_auth(ts_inference_key))
        self.upstream_key = ts_inference_key
        _write_private(self.config_path, render_nginx_conf(self.settings, self.token, self.dir))

    def check_config(self) -> None:
        """``nginx -t`` on the written config; FailedPrecondition with its output."""
        proc = subprocess.run(self._cmd("-t", "-q"), capture_output=True, text=True, timeout=30,
                              env=_child_env())
        if proc.returncode != 0:
            raise FailedPrecondition(f"nginx rejected {self.config_path}: "
                                     f"{(proc.stderr or proc.stdout).strip()}")

    def start(self, ts_inference_key: str, timeout_s: float = 15.0) -> "NginxProxy":
        """Write the config, check it, start nginx, wait until the public port accepts."""
        if self.running():
            return self
        self.write_config(ts_inference_key)
        self.check_config()
        self.error_log.touch(mode=0o600)
        log.info("starting the REST proxy (nginx) on %s -> TorchServe 127.0.0.1:%d",
                 _listen(self.settings.host, self.settings.inference_port),
                 self.settings.ts_inference_port)
        self._proc = subprocess.Popen(self._cmd(), cwd=self.dir, env=_child_env(),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._accepting():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise Unavailable(f"nginx did not start on port {self.settings.inference_port}; "
                                  f"end of {self.error_log}:\n{tail}")
            time.sleep(0.05)
        return self

    def _accepting(self) -> bool:
        import socket

        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            self.settings.host, self.settings.host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((host, self.settings.inference_port)) == 0

    def workers(self) -> set[int]:
        """Pids of the master's worker processes that still accept requests."""
        if not self.running():
            return set()
        import psutil

        found = set()
        try:
            for child in psutil.Process(self._proc.pid).children():
                try:
                    if "shutting down" not in " ".join(child.cmdline()):
                        found.add(child.pid)
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return found

    def set_upstream_key(self, ts_inference_key: str, timeout_s: float = 10.0) -> None:
        """TorchServe's new inference key: rewrite the include, reload, wait for new workers."""
        _write_private(self.dir / UPSTREAM_AUTH_FILE, render_upstream_auth(ts_inference_key))
        if not self.running():
            self.upstream_key = ts_inference_key
            return
        old = self.workers()
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self.workers()
            if now and not (now & old):
                self.upstream_key = ts_inference_key  # only now: a failed reload is retried
                log.info("REST proxy reloaded with TorchServe's renewed inference key")
                return
            time.sleep(0.02)
        raise Unavailable(f"nginx did not reload within {timeout_s:.0f}s; end of "
                          f"{self.error_log}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (graceful: requests in flight finish), SIGKILL after ``timeout``.

        Returns when no process of its group is left: a worker whose master died (killed)
        goes on listening on the public port, and nginx started again could not bind it.
        """
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("nginx did not stop after %s; killing it", signal.Signals(sig).name)
        try:  # workers that outlived their master
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 5.0
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is left (zombies, which hold no socket, aside)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return False


def _child_env() -> dict[str, str]:
    from service.auth import scrubbed_env

    return scrubbed_env(os.environ)
