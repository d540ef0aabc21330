"""Generated protobuf and gRPC code (scripts/gen_proto.py); never edited by hand."""
