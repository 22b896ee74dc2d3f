"""Copies of stored results for other systems (InfluxDB for dashboards)."""
