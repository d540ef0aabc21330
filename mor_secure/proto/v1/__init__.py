"""Generated from proto/mor_secure/proto/v1/ by scripts/gen_proto.py: do not edit; regenerate."""
