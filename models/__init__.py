"""Recipes of known models, one TOML file each (read by edgepack.recipes)."""
