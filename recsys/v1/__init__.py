"""Generated gRPC code for the ``recsys.v1`` API (do not edit; see scripts/gen_protos.py)."""
