"""Installed as the data package ``bbprobe_share`` (pyproject.toml): targets tables,
example configs and the Grafana dashboard, read through ``agent.share``."""
