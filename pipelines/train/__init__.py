"""Training of the unified model: Ray Train + DeepSpeed (ZeRO, MoE expert parallel) over the Parquet shards."""
