"""Installed as the data package ``bbprobe_share.systemd`` (pyproject.toml): the units,
read through ``agent.share``."""
