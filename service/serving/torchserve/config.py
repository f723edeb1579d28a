"""TorchServe's ``config.properties`` for ``modelctl serve``, rendered from ServeSettings.

Pure: no file or network access. TorchServe reads the file with ``java.util.Properties``,
so values are escaped for that format (a backslash is an escape character there, which
matters for the ``allowed_urls`` regular expression).
"""

from __future__ import annotations

import re

from service.serving.settings import ServeSettings

LOOPBACK = "127.0.0.1"


def java_regex_literal(text: str) -> str:
    """``text`` as a java.util.regex pattern matching exactly itself.

    Every ASCII character other than a letter, digit, ``/`` or ``_`` is backslash-escaped
    (Java reads a backslash before a non-alphabetic character as "this character");
    other characters are literals in a Java regex already.
    """
    return "".join("\\" + c if (c.isascii() and not (c.isalnum() or c in "/_")) else c
                   for c in text)


def store_url_pattern(settings: ServeSettings) -> str:
    """Regex TorchServe's ``allowed_urls`` gets: only ``file://<store>/<name>/<int>.mar``."""
    root = settings.model_store.as_posix().rstrip("/")
    return f"file://{java_regex_literal(root)}/[^/]+/[0-9]+\\.mar"


def properties_escape(value: str) -> str:
    """Escape a value for java.util.Properties (ISO-8859-1 with \\uXXXX escapes)."""
    out = []
    for i, c in enumerate(value):
        if c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif c == " " and i == 0:
            out.append("\\ ")  # leading blanks would be dropped
        elif ord(c) > 0x7E or ord(c) < 0x20:
            data = c.encode("utf-16-be")
            for j in range(0, len(data), 2):
                out.append("\\u%04X" % int.from_bytes(data[j:j + 2], "big"))
        else:
            out.append(c)
    return "".join(out)


def _http(host: str, port: int) -> str:
    # IPv6 literals need brackets in a URL.
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def frontend_jvm_args(settings: ServeSettings) -> list[str]:
    """The JVM options of TorchServe's frontend (``vmargs``), in order."""
    s = settings
    # A JVM that ran out of heap goes on with some of its threads dead: exit instead, so that
    # `modelctl serve` restarts it (service/serving/torchserve/supervisor.py).
    args = [f"-Xms{s.frontend_heap_mb}m", f"-Xmx{s.frontend_heap_mb}m", "-XX:+AlwaysPreTouch",
            "-XX:+ExitOnOutOfMemoryError"]
    tmp = (s.state_dir / "tmp").as_posix()
    # TorchServe splits vmargs on blanks: a path with one is left to TEMP, which
    # TorchServeProcess sets to the same directory.
    if not re.search(r"\s", tmp):
        args.append(f"-Djava.io.tmpdir={tmp}")
    return args + s.frontend_jvm_options.split()


def render_config_properties(settings: ServeSettings) -> str:
    """The text of ``config.properties`` for one TorchServe instance."""
    s = settings
    entries: list[tuple[str, str, str]] = [
        # (comment, key, value)
        (f"REST inference (/predictions, /ping): loopback only. The public REST endpoint "
         f"({s.host}:{s.inference_port}) is nginx (service/serving/torchserve/proxy.py), which checks "
         "the operator's API token and forwards here with TorchServe's inference key.",
         "inference_address", _http(LOOPBACK, s.ts_inference_port)),
        ("Management API: needed to register models and read worker status, but never "
         "exposed: loopback only.",
         "management_address", _http(LOOPBACK, s.management_port)),
        ("Prometheus metrics: public so a scraper can reach it.",
         "metrics_address", _http(s.host, s.metrics_port)),
        ("Default 'log' only writes metrics to the log and leaves /metrics empty.",
         "metrics_mode", "prometheus"),
        ("TorchServe's own gRPC inference sits behind our gateway (which maps its errors "
         "to proper status codes): loopback only, on its own port.",
         "grpc_inference_address", LOOPBACK),
        ("", "grpc_inference_port", str(s.ts_grpc_inference_port)),
        ("gRPC management: loopback only, like the REST management API.",
         "grpc_management_address", LOOPBACK),
        ("", "grpc_management_port", str(s.grpc_management_port)),
        (f"TorchServe's model store is not the real one ({s.model_store.as_posix()}) but a "
         "directory of symlinks <name>-v<version>.mar to its archives, registered by file "
         "name: TorchServe copies a file:// archive into its model store under the URL's "
         "base name, so <version>.mar of two models would collide.",
         "model_store", s.archive_dir.as_posix()),
        ("URLs the management API may register: file:// URLs of archives of the real "
         "model store (<name>/<version>.mar) and nothing else (no http downloads).",
         "allowed_urls", store_url_pattern(s)),
        ("Models are registered and scaled through the management API.",
         "enable_model_api", "true"),
        ("Every REST and gRPC call needs 'Authorization: Bearer <key>' from key_file.json "
         "(explicit, so a changed default cannot silently open the APIs). Kept on behind "
         "the proxy and the gateway: another local user or process cannot use the loopback "
         "ports without the keys, which only the state dir's owner can read.",
         "disable_token_authorization", "false"),
        ("Minutes until the inference and management keys expire (TorchServe's default 60, "
         "explicit here); renewed with the API key.",
         "token_expiration_min", str(s.token_expiration_min)),
        ("Workers per model when a registration names none.",
         "default_workers_per_model", str(s.workers_per_model)),
        ("Workers listen on unix sockets /tmp/.ts.sock.<port> numbered from here: one base "
         "per TorchServe instance on a machine, or their workers collide.",
         "initial_worker_port", str(s.worker_port_base)),
        ("Archives carry no requirements.txt to pip-install at load time; the environment "
         "is already complete (and may be offline).",
         "install_py_dep_per_model", "false"),
        ("Largest request / response (bytes), REST and gRPC; the default 6.5 MB is too "
         "small for batches of images.",
         "max_request_size", str(s.max_request_size_bytes)),
        ("", "max_response_size", str(s.max_request_size_bytes)),
        ("Seconds a worker may take for one batch before TorchServe restarts it.",
         "default_response_timeout", str(s.response_timeout_s)),
        (f"Requests one model version may have waiting. TorchServe answers a full queue "
         f"like a model without workers (503 'has no worker'), so the REST proxy and the gRPC "
         f"gateway each let at most {s.admit_per_model} requests of a model through at once "
         "(429 / RESOURCE_EXHAUSTED beyond) and this queue never fills from them.",
         "job_queue_size", str(s.job_queue_size)),
    ]
    entries.append((
        f"The frontend's JVM: a fixed heap of {s.frontend_heap_mb} MiB (frontend_heap_mb), touched "
        "at start, so its resident memory does not climb as the JVM grows the heap under load "
        "(by default towards 1/4 of the machine's or the container's memory); out of heap, it "
        "exits rather than run on half-broken; then frontend_jvm_options. TorchServe splits "
        "this value on blanks.",
        "vmargs", " ".join(frontend_jvm_args(s))))
    lines = [
        "# TorchServe config.properties generated by `modelctl serve` "
        "(service/serving/torchserve/config.py).",
        "# Rewritten on every start: change ServeSettings / MODELCTL_* variables, not this file.",
    ]
    for comment, key, value in entries:
        if comment:
            lines.append("")
            lines.extend(f"# {part}" for part in _wrap(comment))
        lines.append(f"{key}={properties_escape(value)}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 86) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


def parse_properties(text: str) -> dict[str, str]:
    """Minimal reader of what :func:`render_config_properties` writes (for tests, tools)."""
    props = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = re.sub(
            r"\\(u[0-9A-Fa-f]{4}|.)",
            lambda m: (chr(int(m.group(1)[1:], 16)) if m.group(1).startswith("u")
                       and len(m.group(1)) == 5
                       else {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1), m.group(1))),
            value.lstrip(),
        )
    return props
