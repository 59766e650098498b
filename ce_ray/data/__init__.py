"""Photos to crops: the offline corpus, bundled photos, ingest into Parquet shards, crops, picture
grids, the Ray Data and local streams."""
