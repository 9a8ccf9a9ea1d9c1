"""Reporting: comparison tables across runs, figures and rich tables from plain records and arrays."""
