#!/usr/bin/env python3
"""A real kube-apiserver with etcd on 127.0.0.1, for tests; no kubelet, no controllers.

    python scripts/k8s/local_apiserver.py DIR     # start, print the kubeconfig, run until Ctrl-C

or, from Python (tests)::

    with LocalApiServer(workdir) as api:
        api.kubeconfig      # admin (system:masters) kubeconfig, also for kubectl
        api.url, api.token

The kube-apiserver binary comes from ``scripts/k8s/build-apiserver.sh`` (built once from
Debian's kubernetes source package, then cached); etcd from apt (``etcd-server``). Both
listen on free ports. Authentication: one static admin token; authorization: RBAC, so a
request impersonating a service account is checked against its Roles. The ServiceAccount
admission plugin is off (no token controller runs). Only what the apiserver itself does
exists: no controller creates pods for a Job, no garbage collector removes a Job deleted in
the foreground; a test plays those parts through the API (the status subresource, finalizers).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_apiserver() -> Path:
    """The kube-apiserver binary (built and cached by build-apiserver.sh on first use)."""
    proc = subprocess.run(["bash", str(HERE / "build-apiserver.sh")], capture_output=True, text=True,
                          timeout=45 * 60)
    if proc.returncode != 0:
        raise RuntimeError(f"build-apiserver.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class LocalApiServer:
    def __init__(self, workdir: Path | str, *, apiserver: Path | str | None = None, startup_timeout_s: float = 60):
        self.workdir = Path(workdir)
        self.apiserver = Path(apiserver) if apiserver else None
        self.startup_timeout_s = startup_timeout_s
        self.token = secrets.token_hex(16)
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.workdir / "kubeconfig"
        self._procs: list[subprocess.Popen] = []

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "LocalApiServer":
        if self.apiserver is None:
            self.apiserver = build_apiserver()
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not found: build-apiserver.sh installs etcd-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_etcd(etcd)
            self._start_apiserver()
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        logf = open(self.workdir / log_name, "ab")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        logf.close()
        self._procs.append(proc)
        return proc

    def _start_etcd(self, etcd: str) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        proc = self._spawn([etcd, "--name", "test", "--data-dir", str(self.workdir / "etcd"),
                            "--listen-client-urls", client, "--advertise-client-urls", client,
                            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                            "--initial-cluster", f"test={peer}", "--unsafe-no-fsync"], "etcd.log")
        self._wait(lambda: _http_ok(f"{client}/health"), proc, "etcd", "etcd.log")

    def _start_apiserver(self) -> None:
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        key = self.workdir / "sa.key"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        tokens.chmod(0o600)
        proc = self._spawn([
            str(self.apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--insecure-port=0",
            f"--cert-dir={certs}", "--advertise-address=127.0.0.1",
            f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            "--logtostderr=true", "-v=1",
        ], "kube-apiserver.log")
        self._wait(lambda: _http_ok(f"{self.url}/readyz", self.token), proc, "kube-apiserver",
                   "kube-apiserver.log")

    def _wait(self, ready, proc, what, log_name) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited ({proc.returncode}):\n{self._tail(log_name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready after {self.startup_timeout_s:.0f}s:\n{self._tail(log_name)}")

    def _tail(self, log_name: str, n: int = 4000) -> str:
        try:
            return (self.workdir / log_name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def ca_cert(self) -> Path:
        """The apiserver's self-signed certificate (with the CA that signed it), written at
        start into --cert-dir."""
        return self.workdir / "certs" / "apiserver.crt"

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {self.url}
    certificate-authority: {self.ca_cert}
users:
- name: admin
  user:
    token: {self.token}
contexts:
- name: local
  context: {{cluster: local, user: admin}}
current-context: local
""")
        self.kubeconfig.chmod(0o600)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to the apiserver and then etcd; idempotent. The apiserver
        gets 3 s (it would wait for open watches to time out), etcd 10 s."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3 if proc is self._procs[-1] and len(self._procs) > 1 else 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def api_client(self, impersonate: str | None = None):
        """A ``kubernetes`` ApiClient as admin, or impersonating a user such as
        ``system:serviceaccount:<namespace>:<name>`` (checked by RBAC)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_cert)
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        api = client.ApiClient(cfg)
        if impersonate:
            api.set_default_header("Impersonate-User", impersonate)
        return api

    def __enter__(self) -> "LocalApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    # Readiness only, before the certificate is known to be written: no verification.
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with LocalApiServer(argv[0]) as api:
        print(f"kube-apiserver {api.url} (etcd 127.0.0.1:{api.etcd_port}); kubeconfig: {api.kubeconfig}",
              flush=True)
        print(f"  kubectl --kubeconfig {api.kubeconfig} get ns", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
