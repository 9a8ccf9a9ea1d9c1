"""Sizes and knobs of a synthetic data set, and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from maxmatch_cli.errors import MaxMatchError


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of a synthetic data set."""

    n_train: int = 3000
    """Training images."""
    n_dev: int = 500
    """Validation images."""
    n_test: int = 1000
    """Test images (1,000 = the COCO 1K / F30K protocol size)."""
    captions_per_image: int = 5
    """Captions per image, each naming a different subset of the image's objects."""
    n_regions: int = 36
    """Regions per image (BUTD: 36)."""
    feature_dim: int = 2048
    """Region feature dimension (BUTD: 2048)."""
    min_objects: int = 3
    """Fewest objects per image."""
    max_objects: int = 6
    """Most objects per image (capped so that each object gets at least 2 regions)."""
    noise: float = 1.5
    """Standard deviation of the per-dimension Gaussian noise (signal prototypes have unit variance)."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_dev", "n_test"):
            if getattr(self, name) < 0:
                raise MaxMatchError(f"synthetic {name} must be >= 0, got {getattr(self, name)}")
        if self.captions_per_image < 1 or self.feature_dim < 1:
            raise MaxMatchError("synthetic captions_per_image and feature_dim must be >= 1")
        if self.n_regions < 6:
            raise MaxMatchError(f"synthetic n_regions must be >= 6, got {self.n_regions}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise MaxMatchError("synthetic min_objects must be between 1 and max_objects")

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_dev + self.n_test

    @property
    def objects_cap(self) -> int:
        """Most objects that fit: at least 2 regions each and a sixth of the regions left to background."""
        return max(1, min(self.max_objects, (self.n_regions - max(2, self.n_regions // 6)) // 2))


PRESETS: dict[str, SyntheticConfig] = {
    "demo": SyntheticConfig(),
    "tiny": SyntheticConfig(n_train=40, n_dev=12, n_test=20, n_regions=12, feature_dim=32),
}


def synthetic_config(preset: str = "demo", **overrides: Any) -> SyntheticConfig:
    """The configuration of a preset with some fields replaced (``n_train=500``, ``feature_dim=64``, ...)."""
    if preset not in PRESETS:
        raise MaxMatchError(
            f"unknown synthetic preset '{preset}'; available: {', '.join(PRESETS)}.",
            hint="use `extract-features synthetic demo` (the demo data) or `synthetic tiny` (for tests)",
        )
    fields = set(SyntheticConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise MaxMatchError(
            f"unknown synthetic option(s): {', '.join(unknown)}.", hint=f"valid options: {', '.join(sorted(fields))}"
        )
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
