"""Sieve mail filtering (RFC 5228) and its script store (RFC 5804)."""
