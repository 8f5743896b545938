"""On-disk formats: packing, compressed-tensors, sharded safetensors output, and the loader."""
