"""The collector's web edge: routes grouped by who calls them, each declaring its role
where it is registered (routing.py), and the mapping of domain errors to HTTP."""
