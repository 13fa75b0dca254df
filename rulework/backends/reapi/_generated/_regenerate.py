"""Regenerate the REAPI stubs in this folder (generated code: do not edit the `*_pb2*.py`).

Run from the repository root, with `grpcio-tools` and `buildstream` installed:

    python rulework/backends/reapi/_generated/_regenerate.py

The `.proto` sources are the ones the `buildstream` wheel ships (`buildstream/_protos`). The
generated modules are rewritten in two ways, so that they can live in one process with any other
copy of the same protos (buildstream's, BuildGrid's, googleapis-common-protos'):

- imports of the generated modules are made relative to this package (no top-level `google` or
  `build` package of ours shadows or clashes with anyone else's);
- descriptors are registered in a private `DescriptorPool` (`_pool.POOL`) instead of protobuf's
  default pool, where a second definition of `google.rpc.Status` would be a conflict.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "rulework.backends.reapi._generated"
PROTOS = (
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/longrunning/operations.proto",
    "google/rpc/status.proto",
    "google/rpc/code.proto",
    "google/api/annotations.proto",
    "google/api/http.proto",
)
# Modules generated from these packages get rewritten imports; google.protobuf stays as is.
OUR_TOP = ("build", "google.bytestream", "google.longrunning", "google.rpc", "google.api")


def main() -> None:
    # Run as a script, this folder is sys.path[0]: its `google` package would shadow protobuf's.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    import buildstream  # the source of the .proto files
    import grpc_tools

    source = Path(buildstream.__file__).parent / "_protos"
    include = Path(grpc_tools.__file__).parent / "_proto"
    for child in HERE.iterdir():
        if child.is_dir() and child.name != "__pycache__":
            shutil.rmtree(child)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{source}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *PROTOS,
            ],
            check=True,
        )
        for path in sorted(out.rglob("*.py*")):
            rel = path.relative_to(out)
            dest = HERE / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_rewrite(path.read_text(), depth=len(rel.parts) - 1))
        for directory in [HERE, *(p for p in HERE.rglob("*") if p.is_dir())]:
            if directory.name != "__pycache__":
                (directory / "__init__.py").touch()


def _rewrite(text: str, depth: int) -> str:
    up = "." * (depth + 1)

    def relative(match: re.Match[str]) -> str:
        module = match.group(1)
        if module.startswith(OUR_TOP):
            return f"from {up}{module} import"
        return match.group(0)

    text = re.sub(r"^from ([\w.]+) import", relative, text, flags=re.M)
    # Generated code: not ours to lint or type-check.
    text = "# ruff: noqa\n# mypy: ignore-errors\n" + text
    text = text.replace(
        "from google.protobuf import descriptor_pool as _descriptor_pool\n",
        f"from {up}_pool import POOL as _POOL\n",
    )
    return text.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")


if __name__ == "__main__":
    main()
