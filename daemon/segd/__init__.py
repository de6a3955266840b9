"""segd: a folder of photos that sorts itself."""

__version__ = "0.1.0"
