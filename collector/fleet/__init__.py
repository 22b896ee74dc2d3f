"""The fleet: probes and their lines, central instructions and suppression, the fleet view."""
