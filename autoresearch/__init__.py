"""autoresearch: an unattended ML-research daemon (see README.md)."""

__version__ = "0.1.0"
