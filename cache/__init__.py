"""The fused-feature cache: format, writer, reader, manifest, fingerprints."""

from dprgb.cache.reader import Cache, CachedGroup, open_cache
from dprgb.cache.store import EpisodeRecord

__all__ = ["Cache", "CachedGroup", "EpisodeRecord", "open_cache"]
