"""Everything before the cache: readers, alignment, encoders, precompute, demo data."""
