"""Recall at chance: what a model that ranks at random scores, to tell a run that learnt nothing.

With ``n`` images of ``c`` captions each, a random ranking finds an image's first caption in the top ``K`` of the
``n·c`` captions with probability ``1 - prod_{j<K} (1 - c / (n·c - j))`` (image to text), and a caption's image in
the top ``K`` of ``n`` images with probability ``K / n`` (text to image; R@1 = 100/n %).
"""

from __future__ import annotations

__all__ = ["chance_metrics", "at_chance", "CHANCE_FACTOR"]

CHANCE_FACTOR = 2.0
"""A validation RSUM under this multiple of the chance RSUM counts as at chance (a trained model is far above)."""


def chance_metrics(n_images: int, captions_per_image: int) -> dict[str, float]:
    """Expected Recall@{1,5,10} (%) of each direction and RSUM under a random ranking."""
    n_captions = n_images * captions_per_image
    out = {}
    for k in (1, 5, 10):
        miss = 1.0
        for j in range(min(k, n_captions)):
            miss *= max(0.0, 1.0 - captions_per_image / (n_captions - j))
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(1.0, k / n_images)
    out["rsum"] = sum(out.values())
    return out


def at_chance(metrics: dict[str, float], n_images: int, captions_per_image: int) -> str | None:
    """A sentence saying that ``metrics`` are at chance level (None when they are clearly above it)."""
    if n_images < 2 or "rsum" not in metrics:
        return None
    chance = chance_metrics(n_images, captions_per_image)
    if chance["rsum"] >= 600.0 / CHANCE_FACTOR or metrics["rsum"] >= CHANCE_FACTOR * chance["rsum"]:
        return None
    return (f"RSUM {metrics['rsum']:.1f} is at chance level on {n_images} images (random ranking: RSUM "
            f"{chance['rsum']:.1f}, i2t R@1 {chance['i2t_r1']:.1f}, t2i R@1 {chance['t2i_r1']:.1f})")
