#!/usr/bin/env python3
"""Generate Python code for every .proto the service uses, into ``service/_gen/``.

Sources:

* TorchServe's own ``inference.proto`` and ``management.proto``, extracted from the
  installed ``ts/frontend/model-server.jar`` (never copied into the repository, so they
  always match the TorchServe that runs);
* every ``protos/**/*.proto`` of the project:

  - ``protos/modelctl/v1/*.proto``, the project's own (e.g. the control service);
  - ``protos/oip/v2/open_inference_grpc.proto``, the Open Inference Protocol v2 gRPC API
    (proto package ``inference``, service ``GRPCInferenceService``), a verbatim copy from
    github.com/kserve/open-inference-protocol (source, commit and licence in
    ``protos/oip/README.md``), generated to ``service._gen.oip.v2.open_inference_grpc_pb2``
    and ``..._pb2_grpc``. Its package differs from TorchServe's
    (``org.pytorch.serve.grpc.inference``), so both load in one process; it does clash with
    ``tritonclient.grpc``'s own copy (see tests/oip_clients.py).

The include mapping ``-Iservice/_gen=<dir>`` makes grpc_tools write imports such as
``from service._gen import inference_pb2`` directly, with no post-processing. The price
of the mapping: a project proto that imports another one names it by its generated path,
``import "service/_gen/modelctl/v1/common.proto";`` (not ``"modelctl/v1/common.proto"``),
because that is the name protoc knows the file by.

Run from anywhere: ``python scripts/build_protos.py``. Idempotent: the output package is
rebuilt from scratch each time (in a temporary directory, then swapped in).
Needs only the standard library and grpc_tools (plus googleapis-common-protos for
``google/rpc/status.proto``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN_PACKAGE = "service/_gen"
PROJECT_PROTOS = ROOT / "protos"
JAR_PROTOS = ("inference.proto", "management.proto")


def _find_jar() -> Path:
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("build_protos: TorchServe (package 'ts') is not installed")
    for location in spec.submodule_search_locations:
        jar = Path(location) / "frontend" / "model-server.jar"
        if jar.is_file():
            return jar
    sys.exit("build_protos: ts/frontend/model-server.jar not found in the installed TorchServe")


def _extract_jar_protos(jar: Path, dest: Path) -> list[str]:
    names = []
    with zipfile.ZipFile(jar) as zf:
        members = set(zf.namelist())
        for name in JAR_PROTOS:
            member = f"proto/{name}" if f"proto/{name}" in members else name
            if member not in members:
                sys.exit(f"build_protos: {name} not found in {jar}")
            (dest / name).write_bytes(zf.read(member))
            names.append(name)
    return names


def _include_dirs() -> list[str]:
    """Where imported well-known protos live: grpc_tools' own, and googleapis' google/rpc."""
    dirs = []
    grpc_tools_spec = importlib.util.find_spec("grpc_tools")
    if grpc_tools_spec and grpc_tools_spec.submodule_search_locations:
        for loc in grpc_tools_spec.submodule_search_locations:
            if (Path(loc) / "_proto").is_dir():
                dirs.append(str(Path(loc) / "_proto"))
    rpc_spec = importlib.util.find_spec("google.rpc")
    locations = list(rpc_spec.submodule_search_locations or []) if rpc_spec else []
    for loc in locations:
        if (Path(loc) / "status.proto").is_file():
            dirs.append(str(Path(loc).parent.parent))  # the site-packages holding google/rpc
            break
    else:
        dirs.append(sysconfig.get_paths()["purelib"])
    return dirs


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    rc = protoc.main(["grpc_tools.protoc", *args])
    if rc != 0:
        sys.exit(
            f"build_protos: protoc failed ({rc}): {' '.join(args)}\n"
            f"(a project proto imports another as \"{GEN_PACKAGE}/modelctl/v1/x.proto\")"
        )


def build() -> Path:
    jar = _find_jar()
    with tempfile.TemporaryDirectory(prefix="build_protos.") as tmp:
        tmp = Path(tmp)
        jar_dir = tmp / "jar"
        out = tmp / "out"
        jar_dir.mkdir()
        out.mkdir()

        inputs = [f"{GEN_PACKAGE}/{n}" for n in _extract_jar_protos(jar, jar_dir)]
        includes = [f"-I{GEN_PACKAGE}={jar_dir}"]
        if PROJECT_PROTOS.is_dir():
            own = sorted(PROJECT_PROTOS.rglob("*.proto"))
            if own:
                includes.append(f"-I{GEN_PACKAGE}={PROJECT_PROTOS}")
                inputs += [f"{GEN_PACKAGE}/{p.relative_to(PROJECT_PROTOS).as_posix()}" for p in own]
        includes += [f"-I{d}" for d in _include_dirs()]

        _protoc([
            *includes,
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *inputs,
        ])

        gen = out / GEN_PACKAGE
        # Every generated directory is a regular package.
        for d in [gen, *[p for p in gen.rglob("*") if p.is_dir()]]:
            init = d / "__init__.py"
            if not init.exists():
                init.write_text(
                    '"""Generated by scripts/build_protos.py; do not edit, not in git."""\n'
                )

        target = ROOT / GEN_PACKAGE
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(gen, target)
    return target


def main() -> None:
    target = build()
    files = sorted(p.relative_to(ROOT).as_posix() for p in target.rglob("*_pb2*.py"))
    print(f"build_protos: wrote {len(files)} modules to {target.relative_to(ROOT)}/")
    for f in files:
        print(f"  {f}")


if __name__ == "__main__":
    main()
