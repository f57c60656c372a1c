"""The package version: a leaf module (imports nothing of lmkernel), importable from every package."""

__version__ = "0.1.0"
