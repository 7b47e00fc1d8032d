"""HTTP service over the logitstore reader (planned: see the project's HTTP issue).

It may import only the public ``logitstore`` API; ``logitstore`` never imports it.
"""
