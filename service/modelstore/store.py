"""Versioned archives on disk: ``<root>/<name>/<version>.mar`` plus ``<version>.json``.

A version is immutable. Writing one that exists is refused with AlreadyExists. Every
write is atomic: the archive is built in a staging directory inside the store (same
filesystem), fsynced, and published with ``os.link``, which fails rather than overwrite,
so a reader never sees a partial archive and two writers never clobber each other. The
staging directory is removed whatever happens. A store that cannot take the write (full,
read-only) raises StoreUnwritable naming the cause (ENOSPC, EROFS, ...), and nothing of
the version is left visible.

A version is its ``<version>.mar``. Its lineage sidecar ``<version>.json`` is published
(renamed into place, directory fsynced) before the archive is linked, so an archive is
never visible without its lineage, whatever step a crash interrupts; a sidecar left alone
by a crash is invisible and replaced by the next write of that version. ``deployment.json``
(:mod:`service.deploy.desired`) is replaced atomically and durably under the model's lock.

The lineage is immutable too (the archive holds a copy, and its sha256 names the archive's).
What is decided about a version later, a deploy policy's comparison and measurements, goes
to ``<version>.deploy.json`` beside it (:meth:`ModelStore.record_deploy_decision`): a list of
decisions, one per job, replaced atomically and durably under the model's lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import service
from service import atomic, faultpoints
from service.deploy.desired import DEPLOYMENT_FILE, DesiredState, read_desired, write_desired
from service.errors import AlreadyExists, InvalidSpec, NotFound, StoreUnwritable, shown
from service.inference.options import MODEL_CONFIG_FILE, ServingOptions
from service.models.bundle import LINEAGE_FILE, WEIGHTS_FILE, ModelBundle, state_dict_sha256
from service.modelstore.names import NAME_RE, validate_model_name

ARCHIVE_SUFFIX = ".mar"
#: ``<root>/<name>/<version>.deploy.json``: the deploy decisions made about a version.
DEPLOY_RECORD_SUFFIX = ".deploy.json"
#: Decisions kept per version (the oldest go first).
MAX_DEPLOY_DECISIONS = 100
HANDLER_MODULE = "modelctl_handler"
# The only code inside an archive: a shim naming our installed handler. Nothing the
# user wrote is ever packed or executed.
HANDLER_SHIM = '''"""TorchServe entry point of a modelctl archive (generated; not user code)."""
from service.handlers.torchserve import handle  # noqa: F401
'''


@dataclass(frozen=True)
class ArchiveInfo:
    name: str
    version: int
    path: Path
    lineage: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_fsync = atomic.fsync_path  # flush a file's (or a directory's entries') data to disk


#: errno values that mean the store's filesystem is full, and that it is not writable.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def _unwritable(root: Path, what: str, exc: OSError) -> StoreUnwritable:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    cause = ("the store is full" if exc.errno in _FULL else
             "the store is not writable" if exc.errno in _NOT_WRITABLE else "the write failed")
    where = f" ({exc.filename})" if exc.filename else ""
    return StoreUnwritable(f"model store {root} cannot take {what}: {cause}: {exc.strerror or exc} "
                           f"[{code}]{where}; nothing was published")


class ModelStore:
    """The model store rooted at ``root``."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    # ---- reading -------------------------------------------------------------------
    def models(self) -> dict[str, list[int]]:
        """Every model name with its versions, ascending. Anything else is ignored."""
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return found
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.is_dir() and NAME_RE.fullmatch(model_dir.name):
                versions = self._versions_in(model_dir)
                if versions:
                    found[model_dir.name] = versions
        return found

    @staticmethod
    def _versions_in(model_dir: Path) -> list[int]:
        versions = []
        for path in model_dir.glob(f"*{ARCHIVE_SUFFIX}"):
            stem = path.name[: -len(ARCHIVE_SUFFIX)]
            if (stem.isascii() and stem.isdigit() and len(stem) <= 18 and int(stem) > 0 and str(int(stem)) == stem
                    and path.is_file()):
                versions.append(int(stem))
        return sorted(versions)

    def versions(self, name: str) -> list[int]:
        return self._versions_in(self.root / validate_model_name(name))

    def path(self, name: str, version: int) -> Path:
        return self.root / validate_model_name(name) / f"{int(version)}{ARCHIVE_SUFFIX}"

    def get(self, name: str, version: int | None = None) -> ArchiveInfo:
        """One archive (the latest version when ``version`` is None); NotFound if absent."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"model {name!r} has no archive in {self.root}")
        version = versions[-1] if version is None else int(version)
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version} (versions: {versions})")
        return ArchiveInfo(name, version, self.path(name, version), self.lineage(name, version))

    def lineage(self, name: str, version: int) -> dict:
        sidecar = self.path(name, version).with_suffix(".json")
        if sidecar.exists():
            return json.loads(sidecar.read_text())
        return {}

    def list(self) -> list[ArchiveInfo]:
        return [self.get(name, v) for name, versions in self.models().items() for v in versions]

    # ---- deploy decisions -------------------------------------------------------------
    def deploy_decisions(self, name: str, version: int) -> list[dict]:
        """The deploy decisions recorded about a version, oldest first ([] when none).
        A record that cannot be read raises InvalidSpec naming it."""
        path = self.path(name, version).with_name(f"{int(version)}{DEPLOY_RECORD_SUFFIX}")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise InvalidSpec(str(path), f"is not a deploy record: {exc}") from exc
        decisions = data.get("decisions") if isinstance(data, dict) else None
        if not isinstance(decisions, list):
            raise InvalidSpec(str(path), "is not a deploy record: it has no list of decisions")
        return [d for d in decisions if isinstance(d, dict)]

    def record_deploy_decision(self, name: str, version: int, decision: Mapping[str, Any]) -> None:
        """Add ``decision`` to the version's deploy record, atomically and durably, under the
        model's lock. One of the same ``job_id`` is replaced: a job finished again after a
        restart decides again. An unreadable record is replaced (the job store keeps each
        job's own copy). The version must exist."""
        version = int(version)
        decision = dict(decision)
        try:
            with self._locked(validate_model_name(name)) as model_dir:
                if version not in self._versions_in(model_dir):
                    raise NotFound(f"model {name!r} has no version {version}")
                try:
                    kept = self.deploy_decisions(name, version)
                except InvalidSpec:
                    kept = []
                job = decision.get("job_id")
                kept = [d for d in kept if job is None or d.get("job_id") != job] + [decision]
                record = {"name": name, "version": version, "decisions": kept[-MAX_DEPLOY_DECISIONS:]}
                atomic.write_text(model_dir / f"{version}{DEPLOY_RECORD_SUFFIX}",
                                  json.dumps(record, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise _unwritable(self.root, f"the deploy record of {name!r} version {version}", exc) from exc

    # ---- desired serving state ------------------------------------------------------
    def desired(self, name: str) -> DesiredState | None:
        """The model's desired serving state; None when none was set (serve the latest).

        A file that cannot be read as one (hand-edited, truncated) raises InvalidSpec
        naming it: replicas keep what they serve rather than guess.
        """
        return read_desired(self.root / validate_model_name(name), name)

    def default_version(self, name: str) -> int | None:
        """The version replicas serve as default: the desired one when it exists in the
        store, else the latest; None for a model without archives."""
        versions = self.versions(name)
        if not versions:
            return None
        desired = self.desired(name)
        return desired.version if desired is not None and desired.version in versions else versions[-1]

    def set_desired(self, name: str, version: int, workers: int, reason: str = "") -> DesiredState:
        """Record ``version`` (which must exist) as the model's default, atomically."""
        version, workers = int(version), int(workers)
        if workers < 0:
            raise InvalidSpec("workers", f"must be >= 0, got {workers}")
        try:
            with self._locked(validate_model_name(name)) as model_dir:
                versions = self._versions_in(model_dir)
                if version not in versions:
                    raise NotFound(f"model {name!r} has no version {version} (versions: {versions})")
                state = DesiredState(name, version, workers, _now(), reason)
                write_desired(model_dir, state)
        except OSError as exc:
            raise _unwritable(self.root, f"the deployment record of {name!r}", exc) from exc
        return state

    # ---- writing -------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str):
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield model_dir
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(
        self,
        name: str,
        bundle: ModelBundle,
        version: int | None = None,
        options: ServingOptions | None = None,
        *,
        keep_default: bool = False,
    ) -> ArchiveInfo:
        """Write ``bundle`` as a new archive version and return it.

        ``version`` None takes the next free one. An existing version is refused.
        ``keep_default``: the new version must not become the default by itself (a
        fine-tuned version waits for its deployment): a model that has versions but no
        desired state gets one naming its current latest version first, in the same lock.
        """
        validate_model_name(name)
        if version is not None and (not isinstance(version, int) or version < 1):
            raise InvalidSpec("version", f"must be an integer >= 1, got {shown(version)}")
        bundle.validate()
        options = options or ServingOptions()
        check = options.precision_check
        if check is not None and check.get("weights_sha256") != state_dict_sha256(bundle.state_dict):
            raise InvalidSpec("precision_check", "was run on other weights than this bundle's")
        try:
            with self._locked(name) as model_dir:
                existing = self._versions_in(model_dir)
                if version is None:
                    version = (existing[-1] + 1) if existing else 1
                final = model_dir / f"{version}{ARCHIVE_SUFFIX}"
                if final.exists():
                    raise AlreadyExists(f"model {name!r} version {version} exists; versions are immutable")
                for stale in model_dir.glob(".staging-*"):  # a writer's, killed: writers hold this lock
                    shutil.rmtree(stale, ignore_errors=True)
                if keep_default and existing and not (model_dir / DEPLOYMENT_FILE).exists():
                    write_desired(model_dir, DesiredState(name, existing[-1], 0, _now(),
                                                          f"kept when version {version} was written"))
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
                try:
                    lineage = self._lineage(name, version, bundle, options)
                    mar = self._build_archive(staging, name, version, bundle, lineage, options)
                    lineage["archive_sha256"] = _sha256_file(mar)
                    _fsync(mar)
                    sidecar = final.with_suffix(".json")
                    # The lineage first: a version is its .mar, so a sidecar alone is invisible (one
                    # left by a crash here is replaced by the next write of that version).
                    try:
                        atomic.atomic_write(sidecar, json.dumps(lineage, indent=2, sort_keys=True) + "\n")
                        faultpoints.point("store.lineage_published")
                        try:
                            os.link(mar, final)  # atomic publish; never overwrites
                        except FileExistsError as exc:
                            raise AlreadyExists(f"model {name!r} version {version} exists") from exc
                    except BaseException:
                        if not final.exists():
                            sidecar.unlink(missing_ok=True)
                        raise
                    faultpoints.point("store.archive_published")
                    _fsync(model_dir)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            what = f"{name!r} version {version}" if version is not None else f"a new version of {name!r}"
            raise _unwritable(self.root, what, exc) from exc
        return ArchiveInfo(name, version, final, lineage)

    @staticmethod
    def _lineage(name: str, version: int, bundle: ModelBundle, options: ServingOptions) -> dict:
        spec_json = json.dumps(bundle.spec.to_dict(), sort_keys=True)
        record = {
            "name": name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "family": bundle.spec.family,
            "task": bundle.spec.task,
            "num_classes": bundle.spec.num_classes,
            "spec_sha256": hashlib.sha256(spec_json.encode()).hexdigest(),
            "code_version": service.__version__,
            "parent": None,
            "source": "archive",
        }
        record.update(bundle.lineage)  # the caller's facts (parent, dataset, metrics...) win
        record["name"], record["version"] = name, version
        # ...but not over how this archive is served: a bundle read back from an older
        # archive carries that archive's options and precision check.
        record["serving"] = options.lineage()
        return record

    @staticmethod
    def _build_archive(
        staging: Path, name: str, version: int, bundle: ModelBundle, lineage: dict, options: ServingOptions
    ) -> Path:
        """Pack the bundle with torch-model-archiver; return the .mar path in staging."""
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging_utils import ModelExportUtils

        files = staging / "files"
        bundle_with_lineage = ModelBundle(
            bundle.spec, bundle.state_dict, bundle.labels, bundle.vocab, lineage
        )
        bundle_with_lineage.save(files)
        (files / f"{HANDLER_MODULE}.py").write_text(HANDLER_SHIM)
        (files / MODEL_CONFIG_FILE).write_text(options.to_yaml())
        lineage["weights_sha256"] = _sha256_file(files / WEIGHTS_FILE)
        (files / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        config = ModelArchiverConfig(
            model_name=name,
            handler=f"{HANDLER_MODULE}.py",
            version=str(version),
            serialized_file=WEIGHTS_FILE,
            config_file=MODEL_CONFIG_FILE,
            export_path=str(staging),
            archive_format="default",
        )
        manifest = ModelExportUtils.generate_manifest_json(config)
        # Pack our own staged directory: the archiver's copy step uses one shared temp
        # folder per model name, which concurrent writers of one model would clobber.
        ModelExportUtils.archive(str(staging), name, str(files), manifest, "default")
        return staging / f"{name}{ARCHIVE_SUFFIX}"
