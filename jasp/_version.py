"""The source tree's version: what ``jasp --version`` reports when jasp is not installed."""

__version__ = "0.1.0"
