"""Ready pipelines per model family, loaded from diffusers-layout repositories."""

from diffblocks.presets.loading import FAMILIES, Family, family_of, from_pretrained

__all__ = ["FAMILIES", "Family", "family_of", "from_pretrained"]
