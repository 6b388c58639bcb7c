"""Checkpoint I/O: the safetensors reader, shards, loading (+ device/dtype placement), model resolution, atomic
writes, manifest, Hub push, verify."""
