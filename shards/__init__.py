"""Ray preprocessing: Clotho, AudioCaps and WavCaps into WebDataset shards (format: relret/shard_format.py)."""
