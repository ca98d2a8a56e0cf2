"""Regenerate the Python gRPC stubs in serving/generated/ from proto/*.proto.

python proto/generate.py           # write the stubs
python proto/generate.py --check   # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
# The virtual path protoc files the .proto sources under; it becomes the Python
# package of the stubs, so they import each other as serving.generated.x_pb2.
PACKAGE_PATH = "serving/generated"
GENERATED_DIR = REPO_ROOT / PACKAGE_PATH
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> None:
    """Write the stubs for every proto under out_root/serving/generated/."""
    (out_root / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (e.g. google/protobuf/*.proto).
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PACKAGE_PATH}={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{PACKAGE_PATH}/{proto.name}" for proto in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(
            f"protoc failed on {[p.name for p in proto_files()]}; see its message above"
        )


def generated_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def stale_files() -> list[str]:
    """The committed stubs that differ from a fresh generation, are missing or are orphans."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir = Path(tmp) / PACKAGE_PATH
        fresh = generated_names(fresh_dir)
        committed = generated_names(GENERATED_DIR) if GENERATED_DIR.is_dir() else set()
        return sorted(
            f"{PACKAGE_PATH}/{name}"
            for name in fresh | committed
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh_dir / name, GENERATED_DIR / name, shallow=False)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed stubs instead of writing"
    )
    options = parser.parse_args(argv)
    if options.check:
        stale = stale_files()
        if stale:
            print(
                "stale generated stubs (run `make proto` and commit the result):",
                *stale,
                sep="\n  ",
            )
            return 1
        print("generated stubs are up to date")
        return 0
    generate(REPO_ROOT)
    print(f"wrote stubs for {', '.join(p.name for p in proto_files())} to {PACKAGE_PATH}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
