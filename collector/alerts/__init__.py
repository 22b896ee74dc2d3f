"""Alerts: the rules (pure), the worker that runs them on a store, and where they go."""
