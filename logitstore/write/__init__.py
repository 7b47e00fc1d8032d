"""The write side: teachers, on-device encoding, the shard writer and its commit protocol,
capture of a teacher's distributions, input data, and generation of hard-label data."""
