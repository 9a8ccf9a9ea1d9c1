"""Recipes: the frozen dataclasses of every section, loading, --set overrides and the shipped registry."""
