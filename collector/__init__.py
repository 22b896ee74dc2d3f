"""bbprobe collector: stores probe results, serves measurement endpoints, checks compliance."""

from agent import __version__

__all__ = ["__version__"]
