"""Compliance: targets as data, observations from results, a pure evaluator."""
