"""The operator's API token: where it comes from, and how a call is checked against it.

One token guards every API of an instance: REST inference (checked by the nginx proxy,
:mod:`service.serving.torchserve.proxy`), gRPC inference (the gateway) and the control API. It is the
same across replicas and never expires, because the operator provides it:

1. ``MODELCTL_API_TOKEN_FILE``: a file holding it (a mounted Kubernetes Secret);
2. ``MODELCTL_API_TOKEN``: the token itself;
3. otherwise ``<state_dir>/api_token``. A server (``load_token(..., create=True)``)
   generates it there once, mode 0600, and logs where it is; local clients (the CLI, the
   demo, :func:`service.predict_client.read_token`) read it from there. It is written to a
   temporary file, fsynced, then linked into place: never visible empty or partial.

A token is 16 to 4096 characters of RFC 6750's ``b64token`` alphabet
(``A-Z a-z 0-9 - . _ ~ + /``, then ``=`` padding): it travels in an HTTP header and in
nginx's generated configuration, so nothing else is accepted.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import typing
from dataclasses import dataclass, field
from pathlib import Path

from service.atomic import atomic_write
from service.errors import FailedPrecondition, InvalidArgument, Unauthenticated

log = logging.getLogger(__name__)

TOKEN_FILE_ENV = "MODELCTL_API_TOKEN_FILE"
TOKEN_ENV = "MODELCTL_API_TOKEN"
#: The generated token's file in a state dir.
STATE_FILE = "api_token"
#: Variables that carry the token; child processes (TorchServe, nginx) do not inherit them.
SECRET_ENV = (TOKEN_ENV,)

_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_MIN_LEN, _MAX_LEN = 16, 4096
_BEARER_RE = re.compile(r"\s*bearer\s+(\S+)\s*", re.IGNORECASE)

MISSING_MESSAGE = ("missing bearer token: send the header Authorization: Bearer <token> "
                   "(gRPC: authorization metadata) with the API token of this service")
INVALID_MESSAGE = "invalid bearer token"


@dataclass(frozen=True)
class ApiToken:
    """The token (never in a repr or a log line) and where it came from."""

    value: str = field(repr=False)
    source: str

    def header(self) -> str:
        """``Bearer <token>``: the Authorization header or gRPC metadata value."""
        return f"Bearer {self.value}"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata carrying the token."""
        return (("authorization", self.header()),)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless ``authorization`` is ``Bearer <this token>``.

        The scheme is case-insensitive (RFC 7235); the token is compared in constant time.
        """
        if not authorization or not authorization.strip():
            raise Unauthenticated(MISSING_MESSAGE)
        m = _BEARER_RE.fullmatch(authorization)
        if m is None or not hmac.compare_digest(m.group(1).encode(), self.value.encode()):
            raise Unauthenticated(INVALID_MESSAGE)

    def check_metadata(self, metadata) -> None:
        """:meth:`check` on the ``authorization`` entry of gRPC invocation metadata."""
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if len(values) > 1:
            raise Unauthenticated("more than one authorization entry in the call's metadata")
        value = values[0] if values else None
        self.check(value.decode("latin-1") if isinstance(value, bytes) else value)


def validate(value: str, source: str) -> str:
    """``value`` if it is a usable token; InvalidArgument naming ``source`` (never the value)."""
    if not (_MIN_LEN <= len(value) <= _MAX_LEN) or not _TOKEN_RE.fullmatch(value):
        raise InvalidArgument(
            f"{source}: an API token must be {_MIN_LEN} to {_MAX_LEN} characters of "
            "A-Z a-z 0-9 - . _ ~ + / (then = padding), e.g. `openssl rand -hex 32`")
    return value


def state_token_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / STATE_FILE


def _from_environment(environ: typing.Mapping[str, str]) -> ApiToken | None:
    path = environ.get(TOKEN_FILE_ENV, "").strip()
    if path:
        source = f"{TOKEN_FILE_ENV}={path}"
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise FailedPrecondition(f"{source}: cannot read the API token file: "
                                     f"{exc.strerror or exc}") from None
        return ApiToken(validate(text.strip(), source), source)
    value = environ.get(TOKEN_ENV, "").strip()
    if value:
        return ApiToken(validate(value, TOKEN_ENV), TOKEN_ENV)
    return None


def _read_state_file(path: Path) -> ApiToken:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the API token file {path}: "
                                 f"{exc.strerror or exc}") from None
    return ApiToken(validate(text.strip(), str(path)), str(path))


def find_token(state_dir: Path | str | None = None,
               environ: typing.Mapping[str, str] | None = None) -> ApiToken | None:
    """A client's token: the environment's, else ``<state_dir>/api_token``, else None.

    ``state_dir`` defaults to ``$MODELCTL_STATE_DIR`` or ``./.modelctl`` (``modelctl
    serve``'s default). Never creates anything.
    """
    environ = os.environ if environ is None else environ
    token = _from_environment(environ)
    if token is not None:
        return token
    if state_dir is None:
        state_dir = environ.get("MODELCTL_STATE_DIR", "").strip() or Path.cwd() / ".modelctl"
    path = state_token_path(state_dir)
    return _read_state_file(path) if path.exists() else None


def load_token(state_dir: Path | str, environ: typing.Mapping[str, str] | None = None, *,
               create: bool = False) -> ApiToken:
    """A server's token: the environment's, else ``<state_dir>/api_token``.

    With ``create``, a missing state file is generated once (32 random bytes, URL-safe
    base64, mode 0600) and its path logged. Without, a missing token is FailedPrecondition.
    """
    environ = os.environ if environ is None else environ
    token = _from_environment(environ)
    if token is not None:
        log.info("API token from %s", token.source)
        return token
    path = state_token_path(state_dir)
    if create and path.exists() and _blank(path):
        # left empty by a crash of an older version, which created the file before writing it:
        # no client can hold a token from it, so a new one replaces it
        log.warning("API token file %s is empty; generating a new token into it", path)
        _generate(path, replace=True)
    if not path.exists():
        if not create:
            raise FailedPrecondition(
                f"no API token: set {TOKEN_FILE_ENV} or {TOKEN_ENV}, or start `modelctl serve` "
                f"with state dir {Path(state_dir)} once to generate {path}")
        if _generate(path):
            log.info("API token: generated %s (mode 0600); clients on this machine read it "
                     "from there. Set %s or %s to give every instance the same token.",
                     path, TOKEN_FILE_ENV, TOKEN_ENV)
            return _read_state_file(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("API token file %s was readable by others (mode %o); now 0600", path, mode)
        path.chmod(0o600)
    token = _read_state_file(path)
    log.info("API token from %s", path)
    return token


def _blank(path: Path) -> bool:
    try:
        return not path.read_text().strip()
    except OSError:
        return False


def _generate(path: Path, *, replace: bool = False) -> bool:
    """Write a new token to ``path`` with :func:`service.atomic.atomic_write`: a temporary
    file (mode 0600, fsynced), then published with ``os.link`` (which fails if another
    process published one first: theirs is kept) or, with ``replace``, ``os.replace``; the
    directory is fsynced. The file is never visible empty or partial. Returns whether this
    call's token was published."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, secrets.token_urlsafe(32) + "\n", mode=0o600, exclusive=not replace,
                            fault_point="token.temp_written")
    except OSError as exc:
        raise FailedPrecondition(
            f"no API token: {TOKEN_FILE_ENV} and {TOKEN_ENV} are unset, and {path} cannot "
            f"be generated ({exc.strerror or exc})") from None


def scrubbed_env(environ: typing.Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the variables that carry the token itself (for child processes)."""
    return {k: v for k, v in environ.items() if k not in SECRET_ENV}
