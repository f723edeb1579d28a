"""Versioned archives on disk: ``<root>/<name>/<version>.mar`` plus ``<version>.json``.

A version is immutable. Writing one that exists is refused with AlreadyExists. Every
write is atomic: the archive is built in a staging directory inside the store (same
filesystem) and published with ``os.link``, which fails rather than overwrite, so a
reader never sees a partial archive and two writers never clobber each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import service
from service.errors import AlreadyExists, InvalidSpec, NotFound
from service.modelstore.bundle import LINEAGE_FILE, WEIGHTS_FILE, ModelBundle

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ARCHIVE_SUFFIX = ".mar"
HANDLER_MODULE = "modelctl_handler"
# The only code inside an archive: a shim naming our installed handler. Nothing the
# user wrote is ever packed or executed.
HANDLER_SHIM = '''"""TorchServe entry point of a modelctl archive (generated; not user code)."""
from service.handlers.torchserve import handle  # noqa: F401
'''


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidSpec(
            "name",
            f"{name!r} is not a valid model name: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class ServingOptions:
    """Per-model TorchServe options, written into the archive's model-config.yaml."""

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 120

    def __post_init__(self):
        for key in ("batch_size", "response_timeout_s"):
            if getattr(self, key) < 1:
                raise InvalidSpec(key, "must be >= 1")
        if self.max_batch_delay_ms < 0:
            raise InvalidSpec("max_batch_delay_ms", "must be >= 0")

    def to_yaml(self) -> str:
        return (
            f"batchSize: {self.batch_size}\n"
            f"maxBatchDelay: {self.max_batch_delay_ms}\n"
            f"responseTimeout: {self.response_timeout_s}\n"
        )


@dataclass(frozen=True)
class ArchiveInfo:
    name: str
    version: int
    path: Path
    lineage: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
            if model_dir.is_dir() and NAME_RE.match(model_dir.name):
                versions = self._versions_in(model_dir)
                if versions:
                    found[model_dir.name] = versions
        return found

    @staticmethod
    def _versions_in(model_dir: Path) -> list[int]:
        versions = []
        for path in model_dir.glob(f"*{ARCHIVE_SUFFIX}"):
            stem = path.name[: -len(ARCHIVE_SUFFIX)]
            if stem.isdigit() and int(stem) > 0 and str(int(stem)) == stem and path.is_file():
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
    ) -> ArchiveInfo:
        """Write ``bundle`` as a new archive version and return it.

        ``version`` None takes the next free one. An existing version is refused.
        """
        validate_model_name(name)
        if version is not None and (not isinstance(version, int) or version < 1):
            raise InvalidSpec("version", f"must be an integer >= 1, got {version!r}")
        bundle.validate()
        options = options or ServingOptions()
        with self._locked(name) as model_dir:
            existing = self._versions_in(model_dir)
            if version is None:
                version = (existing[-1] + 1) if existing else 1
            final = model_dir / f"{version}{ARCHIVE_SUFFIX}"
            if final.exists():
                raise AlreadyExists(f"model {name!r} version {version} exists; versions are immutable")
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
            try:
                lineage = self._lineage(name, version, bundle, options)
                mar = self._build_archive(staging, name, version, bundle, lineage, options)
                lineage["archive_sha256"] = _sha256_file(mar)
                sidecar_tmp = staging / "lineage.sidecar.json"
                sidecar_tmp.write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
                try:
                    os.link(mar, final)  # atomic publish; never overwrites
                except FileExistsError as exc:
                    raise AlreadyExists(f"model {name!r} version {version} exists") from exc
                os.replace(sidecar_tmp, final.with_suffix(".json"))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
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
            "serving": {
                "batch_size": options.batch_size,
                "max_batch_delay_ms": options.max_batch_delay_ms,
            },
            "code_version": service.__version__,
            "parent": None,
            "source": "archive",
        }
        record.update(bundle.lineage)  # the caller's facts (parent, dataset, metrics...) win
        record["name"], record["version"] = name, version
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
        (files / "model-config.yaml").write_text(options.to_yaml())
        lineage["weights_sha256"] = _sha256_file(files / WEIGHTS_FILE)
        (files / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        config = ModelArchiverConfig(
            model_name=name,
            handler=f"{HANDLER_MODULE}.py",
            version=str(version),
            serialized_file=WEIGHTS_FILE,
            config_file="model-config.yaml",
            export_path=str(staging),
            archive_format="default",
        )
        manifest = ModelExportUtils.generate_manifest_json(config)
        # Pack our own staged directory: the archiver's copy step uses one shared temp
        # folder per model name, which concurrent writers of one model would clobber.
        ModelExportUtils.archive(str(staging), name, str(files), manifest, "default")
        return staging / f"{name}{ARCHIVE_SUFFIX}"
