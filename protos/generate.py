"""Regenerate the Python code for ``internal.proto``, or check that it is fresh.

Usage::

    python -m darktower.protos.generate          # rewrite the generated files
    python -m darktower.protos.generate --check  # exit 1 if any is stale

The generated files are committed so that installing and importing Dark Tower
needs neither protoc nor its plugins; this module is the single recipe that
produces them, so CI (and ``tests/test_protos.py``) can prove the committed
copies match the ``.proto`` they claim to come from.

Three outputs are produced by one protoc run (``grpc_tools.protoc``):

* ``internal_pb2.py`` -- message classes (protoc's builtin Python generator);
* ``internal_pb2.pyi`` -- typing stubs for them (mypy-protobuf), because the
  builtin generator emits untyped, descriptor-built classes;
* ``internal_grpc.py`` -- grpclib service bases and stubs (grpclib's plugin),
  because the project speaks grpclib, not grpcio.

Generated modules import each other by the ``.proto``'s include path, so protoc
must see the file as ``darktower/protos/internal.proto``: the source is copied
into a temporary include tree of that shape. Generating straight from
``protos/`` would yield ``import internal_pb2``, which only works with
``protos/`` itself on ``sys.path``.

The output depends on the versions of grpcio-tools (which bundles protoc and
stamps its version into ``internal_pb2.py``), grpclib and mypy-protobuf; a
different version of any of them can make ``--check`` fail even though the
``.proto`` did not change. Regenerate and commit in that case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: Directory holding the ``.proto`` and, next to it, the committed outputs.
PROTO_DIR = Path(__file__).resolve().parent

#: ``.proto`` sources, relative to :data:`PROTO_DIR`.
PROTO_FILES = ("internal.proto",)

#: Where the sources sit inside the temporary include tree; this prefix
#: becomes the package path in the generated imports.
PACKAGE_PATH = Path("darktower", "protos")

#: protoc plugins used, by the executable name protoc expects.
_PLUGINS = ("protoc-gen-grpclib_python", "protoc-gen-mypy")

#: Distributions whose versions shape the output, reported on a stale check.
_TOOL_DISTRIBUTIONS = ("grpcio-tools", "protobuf", "grpclib", "mypy-protobuf")


class GenerationError(RuntimeError):
    """protoc or one of its plugins is missing or failed."""


def generated_names(proto_files: Sequence[str] = PROTO_FILES) -> list[str]:
    """Return the file names generated for ``proto_files``, sorted.

    Kept explicit (rather than "whatever protoc wrote") so an output silently
    disappearing, e.g. a plugin not running, is an error instead of a
    smaller, apparently fresh set.
    """
    names: list[str] = []
    for proto in proto_files:
        stem = Path(proto).stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_grpc.py"]
    return sorted(names)


def _find_plugin(name: str) -> Path:
    """Locate a protoc plugin executable.

    The interpreter's own scripts directory is searched first so the plugin
    matching the running environment wins even when that environment's
    ``bin/`` is not on ``PATH`` (e.g. ``/tmp/venv/bin/python -m ...`` without
    activating the venv).
    """
    search = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    found = shutil.which(name, path=os.pathsep.join(search)) or shutil.which(name)
    if found is None:
        raise GenerationError(
            f"protoc plugin {name!r} not found; install the dev extras "
            "(pip install -e '.[dev]'), which bring grpclib and mypy-protobuf"
        )
    return Path(found)


def _tool_versions() -> str:
    """Describe the generator tool versions, for diagnosing stale output."""
    parts = []
    for dist in _TOOL_DISTRIBUTIONS:
        try:
            parts.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def generate(
    out_dir: Path | None = None,
    *,
    proto_dir: Path = PROTO_DIR,
    proto_files: Sequence[str] = PROTO_FILES,
) -> dict[str, bytes]:
    """Run protoc on ``proto_files`` and return ``{file name: content}``.

    If ``out_dir`` is given the files are also written there (flat, without
    the ``darktower/protos`` prefix); pass :data:`PROTO_DIR` to update the
    committed copies, or a temporary directory to compare against them.

    Raises :class:`GenerationError` if protoc fails or an expected output is
    missing.
    """
    with tempfile.TemporaryDirectory(prefix="dt-protos-") as tmp:
        root = Path(tmp)
        include = root / "include"
        build = root / "build"
        (include / PACKAGE_PATH).mkdir(parents=True)
        build.mkdir()
        for proto in proto_files:
            shutil.copyfile(proto_dir / proto, include / PACKAGE_PATH / proto)

        grpclib_plugin, mypy_plugin = (_find_plugin(name) for name in _PLUGINS)
        # Paths are relative to the include root (cwd) so that absolute temp
        # paths cannot leak into the generated code's comments.
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--plugin=protoc-gen-grpclib_python={grpclib_plugin}",
            f"--plugin=protoc-gen-mypy={mypy_plugin}",
            f"--python_out={build}",
            f"--grpclib_python_out={build}",
            f"--mypy_out={build}",
            *(str(PACKAGE_PATH / proto) for proto in proto_files),
        ]
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd, cwd=include, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise GenerationError(
                f"protoc failed (exit {result.returncode}):\n{result.stderr.strip()}"
            )

        outputs: dict[str, bytes] = {}
        for name in generated_names(proto_files):
            path = build / PACKAGE_PATH / name
            if not path.is_file():
                raise GenerationError(f"protoc did not produce {name}")
            outputs[name] = path.read_bytes()

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, content in outputs.items():
            (out_dir / name).write_bytes(content)
    return outputs


def stale_files(
    committed_dir: Path | None = None, fresh: dict[str, bytes] | None = None
) -> list[str]:
    """Return the generated files in ``committed_dir`` (default
    :data:`PROTO_DIR`) that differ from a fresh generation or are missing,
    sorted.

    ``fresh`` may be passed to reuse an earlier :func:`generate` result.
    """
    if committed_dir is None:
        committed_dir = PROTO_DIR
    if fresh is None:
        fresh = generate()
    stale = []
    for name, content in sorted(fresh.items()):
        path = committed_dir / name
        if not path.is_file() or path.read_bytes() != content:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m darktower.protos.generate",
        description="Generate (or check) the Python code for Dark Tower's .proto files.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the committed generated files are stale",
    )
    args = parser.parse_args(argv)

    try:
        if args.check:
            return _check()
        written = generate(PROTO_DIR)
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in sorted(written):
        print(f"wrote {PROTO_DIR / name}")
    return 0


def _check() -> int:
    """Implement ``--check``: report stale files and return the exit status."""
    stale = stale_files()
    if not stale:
        print("generated protobuf code is up to date")
        return 0
    print(
        "error: generated protobuf code is stale or missing in "
        f"{PROTO_DIR}: {', '.join(stale)}\n"
        "Regenerate with `nox -s protos` "
        "(or `python -m darktower.protos.generate`) and commit the result.\n"
        f"Generator versions: {_tool_versions()}",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
