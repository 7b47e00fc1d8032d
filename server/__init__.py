"""The HTTP service over the logitstore reader (docs/PROTOCOL.md); started by `logitstore serve`.

It imports the public ``logitstore`` API, the wire framing (``logitstore.format.protocol``)
and the reader's range check (``logitstore.read.store.check_range``); ``logitstore`` never
imports it (only the CLI, the composition root, does, inside ``serve``'s handler).
"""
