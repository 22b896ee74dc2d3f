"""The measurements: a session (``session``) runs the probes, which gather raw observations
only; summaries are computed in ``agent.summary``."""
