"""dprgb: diffusion-policy heads on frozen vision features (RoboTwin)."""

__version__ = "0.1.0"
