"""The package version (kept apart so that modules the package imports can read it without a cycle)."""
__version__ = "0.1.0"
