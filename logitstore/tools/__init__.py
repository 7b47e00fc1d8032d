"""Tools over stores: info, verify and export (no torch)."""
