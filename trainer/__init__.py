"""Everything after the cache: UNet, schedulers, normalizer, training loop, policy."""
