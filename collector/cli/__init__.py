"""``bbprobe-collector``, the command line: a module per command group; helpers in ``common``."""
