"""Checkpoint I/O: the safetensors reader, shards, loading, atomic writes, manifest, Hub, verify."""
