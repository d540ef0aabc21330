"""Mutually authenticated gRPC: credentials from kits, identity from the TLS auth context, authorization, servers."""
