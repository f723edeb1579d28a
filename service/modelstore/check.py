"""The check an archive passes before anything registers it with TorchServe.

TorchServe registers whatever archive it is given; only its workers find out that it is
corrupt, and they crash-loop until the replica gives up on them (``startup_timeout_s``).
A weights file that needs pickled code is refused by the worker too, only later. So every
registration of a model store archive (the start scan, the converger, the deployer) first
asks :func:`check_archive`, which opens the archive the way a worker would and refuses it
with one sentence naming the file and what is wrong:

1. it is a zip whose every member passes its CRC-32 (as ``ZipFile.testzip`` checks, with
   one decompression of the archive in all), with no member outside the archive (absolute
   or ``..`` names);
2. ``MAR-INF/MANIFEST.json`` parses, names the model name and version it is stored under,
   modelctl's handler (``modelctl_handler.py``, the generated shim, byte for byte: an
   archive holds no user code) and ``weights.pt`` as the serialized file;
3. ``model-config.yaml`` is a YAML mapping; ``spec.json`` validates as a
   :class:`~service.models.ModelSpec` that can be served (a segmentation model has at most
   256 classes: its masks are 8-bit); ``labels.json`` (and ``vocab.json``, ``lineage.json``
   where present) parse and fit the spec;
4. ``weights.pt`` loads with ``torch.load(weights_only=True)`` (into CPU memory; nothing
   pickled runs) and its names and shapes fit the model the spec builds (built on the
   meta device: no weights are allocated).

An archive with another handler is refused unless ``MODELCTL_ALLOW_FOREIGN_ARCHIVES=1``
(:data:`ALLOW_FOREIGN_ENV`): the tests and benchmarks of the serving machinery serve
stand-in archives (an echo handler, TorchServe's stock one) and set it; such an archive
gets steps 1 and 2 up to the handler, all that can be known of it. Never set it in
production.

A result is cached per (path, size, mtime, inode) and expected name and version, so the
converge loop pays one ``stat`` per archive and pass; an archive replaced in place is
checked again. A refusal is logged once (ERROR, naming the file and the problem) when it
is first found; :func:`known_refusal` reads the cache without checking (ListModels and the
``modelctl_archive_refused`` metric use it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import NoReturn

from service.errors import ArchiveRefused, InvalidSpec, shown
from service.models.bundle import (
    LABELS_FILE,
    LINEAGE_FILE,
    SPEC_FILE,
    VOCAB_FILE,
    WEIGHTS_FILE,
    ModelBundle,
    read_weights,
    weights_misfit,
)
from service.modelstore.store import HANDLER_MODULE, HANDLER_SHIM

log = logging.getLogger(__name__)

MANIFEST_FILE = "MAR-INF/MANIFEST.json"
HANDLER_FILE = f"{HANDLER_MODULE}.py"
#: Largest JSON or YAML member read into memory (a vocabulary of a million tokens fits).
MAX_TEXT_BYTES = 64 << 20
#: Set to 1: archives whose handler is not modelctl's are served (tests and benchmarks only).
ALLOW_FOREIGN_ENV = "MODELCTL_ALLOW_FOREIGN_ARCHIVES"
#: Results kept (least recently used ones go first).
CACHE_SIZE = 4096

_cache: OrderedDict[tuple, ArchiveRefused | None] = OrderedDict()
_cache_lock = threading.Lock()
_check_lock = threading.Lock()  # one check at a time: a refusal is found, and logged, once


def foreign_archives_allowed() -> bool:
    """Whether archives with another handler than modelctl's are served (:data:`ALLOW_FOREIGN_ENV`)."""
    return os.environ.get(ALLOW_FOREIGN_ENV, "").strip().lower() in ("1", "true", "yes")


def verify_archive(path: os.PathLike | str, *, name: str | None = None, version: int | None = None) -> None:
    """Check the archive at ``path`` now (no cache); raise ArchiveRefused saying why not.

    ``name`` and ``version``: what MANIFEST.json must name (the store's ``<name>/<version>.mar``).
    """
    path = Path(path)

    def refuse(problem: str) -> NoReturn:
        raise ArchiveRefused(path, problem)

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        refuse(f"not a readable zip archive ({exc}): truncated or overwritten?")
    except OSError as exc:
        refuse(f"cannot be read: {exc.strerror or exc}")
    with archive:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts:
                refuse(f"member {shown(info.filename)} would unpack outside the archive's directory")
        # What ZipFile.testzip does (every member read to its end, where its CRC-32 is
        # compared), keeping weights.pt's bytes: the archive is decompressed once.
        weights = None
        for info in archive.infolist():
            try:
                if info.filename == WEIGHTS_FILE:
                    weights = archive.read(info)
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except zipfile.BadZipFile as exc:
                if "CRC" in str(exc):
                    refuse(f"bad CRC-32 for {info.filename}: the archive is corrupt")
                refuse(f"its zip data is damaged at {info.filename} ({exc})")
            except (zlib.error, EOFError, OSError, NotImplementedError) as exc:
                refuse(f"its zip data is damaged at {info.filename} ({type(exc).__name__}: {exc})")
        names = set(archive.namelist())

        def text(member: str, what: str = "") -> str:
            if member not in names:
                refuse(f"has no {member}{what}")
            info = archive.getinfo(member)
            if info.file_size > MAX_TEXT_BYTES:
                refuse(f"{member} is {info.file_size} bytes; at most {MAX_TEXT_BYTES} are read")
            try:
                return archive.read(member).decode("utf-8")
            except UnicodeDecodeError as exc:
                refuse(f"{member} is not UTF-8 text ({exc.reason} at byte {exc.start})")

        def json_member(member: str, what: str = ""):
            try:
                return json.loads(text(member, what))
            except ValueError as exc:
                refuse(f"{member} is not valid JSON ({exc})")

        manifest = json_member(MANIFEST_FILE, ": not a TorchServe model archive")
        model = manifest.get("model") if isinstance(manifest, dict) else None
        if not isinstance(model, dict):
            refuse(f"{MANIFEST_FILE} has no \"model\" object")
        if name is not None and model.get("modelName") != name:
            refuse(f"{MANIFEST_FILE} names the model {shown(model.get('modelName'))}; it is stored as {shown(name)}")
        if version is not None and str(model.get("modelVersion")) != str(int(version)):
            refuse(f"{MANIFEST_FILE} names version {shown(model.get('modelVersion'))}; it is stored as version "
                   f"{int(version)}")
        handler = model.get("handler")
        if handler != HANDLER_FILE:
            if foreign_archives_allowed():
                return  # a stand-in archive of a test: nothing more can be known of it
            refuse(f"{MANIFEST_FILE} names the handler {shown(handler)}, not modelctl's {HANDLER_FILE}")
        if text(HANDLER_FILE) != HANDLER_SHIM:
            refuse(f"{HANDLER_FILE} is not modelctl's generated handler shim (an archive holds no user code)")
        if model.get("serializedFile") != WEIGHTS_FILE:
            refuse(f"{MANIFEST_FILE} names the serialized file {shown(model.get('serializedFile'))}, "
                   f"not {WEIGHTS_FILE}")
        config_file = model.get("configFile")
        if config_file:
            import yaml

            try:
                config = yaml.safe_load(text(str(config_file), f" (the configFile of {MANIFEST_FILE})"))
            except yaml.YAMLError as exc:
                refuse(f"{config_file} is not valid YAML ({str(exc).splitlines()[0]})")
            if not isinstance(config, dict):
                refuse(f"{config_file} is not a YAML mapping")

        from service.models import ModelSpec, Vocabulary
        from service.models.decisions import MAX_MASK_CLASSES

        try:
            spec = ModelSpec.from_dict(json_member(SPEC_FILE))
        except InvalidSpec as exc:
            refuse(f"{SPEC_FILE}: {exc.message}")
        if spec.task == "segmentation" and spec.num_classes > MAX_MASK_CLASSES:
            refuse(f"{SPEC_FILE}: a served mask holds 8-bit class ids, so a segmentation model has at most "
                   f"{MAX_MASK_CLASSES} classes; this one has {spec.num_classes}")
        labels = json_member(LABELS_FILE)
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            refuse(f"{LABELS_FILE} is not a list of label names")
        vocab = None
        if VOCAB_FILE in names:
            tokens = json_member(VOCAB_FILE)
            try:
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ValueError("not a list of tokens")
                vocab = Vocabulary.from_list(tokens)
            except ValueError as exc:
                refuse(f"{VOCAB_FILE}: {exc}")
        if LINEAGE_FILE in names and not isinstance(json_member(LINEAGE_FILE), dict):
            refuse(f"{LINEAGE_FILE} is not a JSON object")
        try:
            ModelBundle(spec, {}, labels, vocab).validate_parts()
        except InvalidSpec as exc:
            refuse(exc.message)

        if weights is None:
            refuse(f"has no {WEIGHTS_FILE}")
        try:
            state_dict = read_weights(io.BytesIO(weights), "cpu", name=WEIGHTS_FILE)
        except InvalidSpec as exc:
            refuse(exc.message)
        misfit = weights_misfit(spec, state_dict)
        if misfit:
            refuse(f"{WEIGHTS_FILE} does not fit {SPEC_FILE} ({spec.family}): {misfit}")


def _key(path: Path, name, version) -> tuple:
    st = os.stat(path)  # FileNotFoundError for a missing archive: the caller's to say
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, name, None if version is None else int(version),
            foreign_archives_allowed())


def check_archive(path: os.PathLike | str, *, name: str | None = None,
                  version: int | None = None) -> ArchiveRefused | None:
    """None when the archive passes :func:`verify_archive`, else the refusal (not raised).

    Cached per (path, size, mtime, inode, name, version); a refusal is logged once, when
    it is found. A missing file raises FileNotFoundError (nothing is cached).
    """
    path = Path(path).absolute()
    key = _key(path, name, version)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    with _check_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        try:
            verify_archive(path, name=name, version=version)
            result = None
        except ArchiveRefused as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - an archive the check cannot vouch for is not served
            log.exception("checking archive %s failed", path)
            result = ArchiveRefused(path, f"cannot be checked ({type(exc).__name__}: {exc})")
        if result is not None:
            log.error("%s; it is not registered (other models and versions are not affected)", result.message)
        with _cache_lock:
            _cache[key] = result
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        return result


def require_archive(path: os.PathLike | str, *, name: str | None = None, version: int | None = None) -> None:
    """Raise ArchiveRefused (FAILED_PRECONDITION) unless the archive passes the check
    (cached: see :func:`check_archive`)."""
    refused = check_archive(path, name=name, version=version)
    if refused is not None:
        raise ArchiveRefused(refused.path, refused.problem)


def known_refusal(path: os.PathLike | str, *, name: str | None = None,
                  version: int | None = None) -> ArchiveRefused | None:
    """The cached refusal of the archive as it is now, without checking it; None when it
    passed, was not checked in this process, or is gone."""
    try:
        key = _key(Path(path).absolute(), name, version)
    except OSError:
        return None
    with _cache_lock:
        return _cache.get(key)
