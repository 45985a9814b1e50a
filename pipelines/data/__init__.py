"""The data stage: read image-text corpora, decode, filter, deduplicate and pre-tokenize
them into Parquet shards, one output shard per input shard, incrementally."""
