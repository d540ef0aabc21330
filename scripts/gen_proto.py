"""Regenerate the committed gRPC code from proto/, or check it has not drifted (`--check`, run by the tests).

    python scripts/gen_proto.py           # rewrite mor_secure/proto/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --check   # exit 1, naming the files, if the committed code differs

The generated files are committed (as Flower does) so installing the package
needs no protoc; the check keeps them equal to what the pinned grpcio-tools
makes of the .proto files.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = Path("mor_secure") / "proto" / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto file; return the generated paths relative to `out_root`."""
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    include = Path(protoc.__file__).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see above)")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed code instead of writing it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        committed = sorted(p.relative_to(REPO) for p in (REPO / PACKAGE_DIR).glob("*_pb2*"))
        if args.check:
            drift = sorted({str(p) for p in set(generated) ^ set(committed)}
                           | {str(p) for p in generated if p in committed
                              and not filecmp.cmp(Path(tmp) / p, REPO / p, shallow=False)})
            if drift:
                print("generated gRPC code differs from proto/: " + ", ".join(drift)
                      + "; run `python scripts/gen_proto.py` and commit the result", file=sys.stderr)
                return 1
            print(f"generated code matches proto/ ({len(generated)} files)")
            return 0
        for stale in set(committed) - set(generated):
            (REPO / stale).unlink()
        for path in generated:
            (REPO / path).write_bytes((Path(tmp) / path).read_bytes())
        print("wrote " + ", ".join(str(p) for p in generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
