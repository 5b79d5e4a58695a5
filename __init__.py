"""dprgb: diffusion-policy heads on frozen vision features (RoboTwin).

    from dprgb import DiffusionRGBPolicy
    policy = DiffusionRGBPolicy.from_checkpoint("runs/arm7/final_policy.pt")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["DiffusionRGBPolicy", "__version__"]

if TYPE_CHECKING:
    from dprgb.trainer.policy import DiffusionRGBPolicy


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    # Lazy: `import dprgb` (and every CLI start) must not pay for importing torch.
    if name == "DiffusionRGBPolicy":
        from dprgb.trainer.policy import DiffusionRGBPolicy

        return DiffusionRGBPolicy
    raise AttributeError(f"module 'dprgb' has no attribute {name!r}")
