"""The fused-feature cache: format, writer, reader, manifest, fingerprints."""
