"""Recipes: the frozen dataclasses of every section, loading, --set overrides and the shipped registry.

Import from :mod:`maxmatch_cli.config.recipes`; :mod:`.sections`, :mod:`.schema` and :mod:`.loading` hold the code.
"""
