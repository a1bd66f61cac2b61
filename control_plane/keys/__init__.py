"""Signing keys: Ed25519 keys encrypted at rest, the in-memory key ring, and the JWKS route."""
