"""The HTTP service over the logitstore reader (docs/PROTOCOL.md); started by `logitstore serve`.

It imports only the public ``logitstore`` API; ``logitstore`` never imports it.
"""
