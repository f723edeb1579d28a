"""The layout shows the architecture (ARCHITECTURE.md): rooms import downward, and each contract
is defined in one place.

These read the source with :mod:`ast` and ``re``; nothing is imported or run. When a test here
fails, either the change put something in the wrong room, or the architecture changed: then
change ARCHITECTURE.md and ``LAYERS`` together.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"

#: Rooms from the bottom up; a room may import its own layer and the layers below it.
#: (ARCHITECTURE.md draws the same picture.)
LAYERS: list[set[str]] = [
    # contracts and small mechanics, no model code
    {"errors", "environ", "atomic", "signals", "faultpoints", "spectext", "bounds", "auth", "rundir", "lazy",
     "grpc_streams", "grpc_server", "metrics", "_gen", "predict_client"},
    {"models"},
    {"inference"},
    {"modelstore", "handlers"},
    {"training", "deploy"},
    {"serving"},
    {"control"},
    {"app", "cli", "demo"},
]

#: Imports that cross a layer upward, each with its reason. Keep this short.
ALLOWED_UPWARD = {
    # ModelStore.write(keep_default=True) pins the current default in deployment.json under the
    # model's lock, before a fine-tuned version is published; the record's format is deployment's.
    ("service.modelstore.store", "service.deploy.desired"),
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "service"


def _layer(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} is in no layer of tests/test_layout.py (and ARCHITECTURE.md)")


def _modules() -> dict[str, Path]:
    found = {}
    for path in SERVICE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if "_gen" in rel.parts:
            continue
        found[".".join(rel.parts).removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every ``service`` module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "service")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "service":  # from service import atomic (a module); __version__ is not one
                names.update(f"service.{a.name}" for a in node.names if not a.name.startswith("__"))
            elif node.module.startswith("service."):
                names.add(node.module)
    return names


def _entry_point(module: str) -> bool:
    """``python -m`` entry points compose what they run: they may import any room."""
    return module.endswith(".__main__")


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _modules()} - {"service"}
    for room in rooms:
        _layer(room)
    declared = set().union(*LAYERS)
    assert declared - rooms == {"_gen"}, "LAYERS names rooms that no longer exist"


def test_rooms_import_downward():
    upward = []
    for module, path in sorted(_modules().items()):
        if _entry_point(module) or module == "service":
            continue
        src = _layer(_room(module))
        for target in sorted(_imports(path)):
            if target == "service" or _room(target) == _room(module):
                continue
            if _layer(_room(target)) > src and (module, target) not in ALLOWED_UPWARD:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that run up the layers of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_the_allowed_exceptions_are_still_needed():
    modules = _modules()
    for module, target in ALLOWED_UPWARD:
        assert target in _imports(modules[module]), f"{module} no longer imports {target}: drop the exception"


def test_the_product_imports_no_tooling():
    for module, path in _modules().items():
        for target in _imports(path):
            assert not target.startswith(("service.tests", "service.benchmarks")), (module, target)
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (tests|testkit|benchmarks)\b", text, re.M), module


# ---- each contract is defined once -------------------------------------------------------------------
def _source() -> dict[str, str]:
    return {m: p.read_text() for m, p in _modules().items()}


@pytest.mark.parametrize(("what", "pattern", "home"), [
    ("the events file name", r"^EVENTS_FILE\s*=", "service.rundir"),
    ("the result file name", r"^RESULT_FILE\s*=", "service.rundir"),
    ("the run's spec file name", r"^RUN_SPEC_FILE\s*=", "service.rundir"),
    ("the trainer's log file name", r"^LOG_FILE\s*=", "service.rundir"),
    ("the checkpoint file name", r"^CHECKPOINT_FILE\s*=", "service.rundir"),
    ("the trainer's argv", r"^def trainer_argv\(", "service.rundir"),
    ("the error line", r"^def error_line\(", "service.rundir"),
    ("the events writer", r"^class EventLog\b", "service.rundir"),
    ("the events reader", r"^class EventTail\b", "service.rundir"),
    ("atomic write-then-replace", r"os\.replace\(", "service.atomic"),
    ("the settings base", r"^class EnvSettings\b", "service.environ"),
    ("signal handlers", r"signal\.signal\((?!.*SIG_DFL)", "service.signals"),
    ("gRPC server construction", r"grpc(\.aio)?\.server\(", "service.grpc_server"),
    ("gRPC health and reflection", r"add_HealthServicer_to_server|enable_server_reflection", "service.grpc_server"),
    ("the token check for gRPC", r"^class AuthInterceptor\b", "service.grpc_server"),
    ("the gRPC error mapping", r"^class ErrorInterceptor\b", "service.grpc_server"),
    ("the desired state record", r"^DEPLOYMENT_FILE\s*=", "service.deploy.desired"),
    ("the deploy policies", r"^DEPLOY_POLICIES\b.*=", "service.deploy.policies"),
    ("the serving options", r"^class ServingOptions\b", "service.inference.options"),
    ("the bundle's file names", r"^WEIGHTS_FILE\s*=", "service.models.bundle"),
])
def test_a_contract_is_defined_in_one_place(what, pattern, home):
    where = [m for m, text in _source().items() if re.search(pattern, text, re.M)]
    assert where == [home], f"{what}: defined in {where}, expected only in {home}"


def test_one_file_name_per_concept():
    """No two modules share a file name (packages' __init__ and __main__ aside), except the
    settings of the two services, which are one concept: the room's environment settings."""
    names = Counter(p.name for p in _modules().values() if p.name not in ("__init__.py", "__main__.py"))
    assert {n for n, c in names.items() if c > 1} == {"settings.py"}


def test_archives_of_before_keep_their_handler_module():
    """Archives in stores name ``service.handlers.torchserve`` in their shim: it must stay."""
    assert (SERVICE / "handlers" / "torchserve.py").is_file()
