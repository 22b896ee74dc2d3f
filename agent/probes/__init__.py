"""Probes gather raw observations only; summaries are computed in ``agent.summary``."""
