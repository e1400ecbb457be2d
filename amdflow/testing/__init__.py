"""Test support: a MongoDB-wire-compatible server for the multi-process tier."""
