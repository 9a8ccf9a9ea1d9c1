"""Reporting: comparison tables across runs, the set-collapse report's files, figures drawn from plain records and
arrays (``plots``), and rich tables."""
