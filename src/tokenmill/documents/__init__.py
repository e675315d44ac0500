"""Documents as Arrow tables: the core schema, readers for source formats, Parquet shard I/O."""
