"""Generates the Python gRPC code from proto/ (the one command: `python scripts/gen_protos.py`).

Each .proto is self-contained (no imports between them) and compiled with a virtual include path
so the generated modules land in, and import from, the Python package that owns them:

    proto/splitserve/worker/v1/worker.proto  -> services/proto/v1/worker_pb2{,_grpc}.py(i)
    proto/splitserve/v1/inference.proto      -> sdk/splitserve_sdk/proto/v1/inference_pb2...
                                                (the public API lives in the SDK, which installs
                                                on its own; the gateway imports it from there)

The generated files are committed; tests/unit/test_protos_fresh.py regenerates them into a
temporary directory and fails when the committed copies are stale. Pass `--out DIR` to write
under another root (that is what the test does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (proto file relative to proto/, source root of the distribution that owns the code, Python
# package directory under that root the code is generated into)
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("splitserve/worker/v1/worker.proto", ".", "services/proto/v1"),
    ("splitserve/v1/inference.proto", "sdk", "splitserve_sdk/proto/v1"),
)


def generate(out_root: Path) -> list[Path]:
    """Generate every target under out_root; return the files written."""
    from grpc_tools import protoc  # imported here: only needed by developers and the test

    include = Path(protoc.__file__).parent / "_proto"
    written: list[Path] = []
    for proto_rel, root_rel, package_dir in TARGETS:
        proto_path = REPO / "proto" / proto_rel
        src_root = out_root / root_rel
        out_dir = src_root / package_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        virtual = f"{package_dir}/{proto_path.name}"
        args = [
            "protoc",
            f"-I{package_dir}={proto_path.parent}",
            f"-I{include}",
            f"--python_out={src_root}",
            f"--pyi_out={src_root}",
            f"--grpc_python_out={src_root}",
            virtual,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto_rel}")
        stem = proto_path.stem
        written += sorted(out_dir.glob(f"{stem}_pb2*"))
        for pkg in [out_dir, *[p for p in out_dir.parents if p != src_root and
                               src_root in p.parents]]:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated gRPC code: see scripts/gen_protos.py."""\n')
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to generate under")
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
