"""The store's bytes: metadata, the column schema, Zarr storage, decoding and the wire
framing (docs/FORMAT.md, docs/PROTOCOL.md). NumPy, Zarr and numcodecs only: no torch."""
