"""The collector's web edge: routes grouped by who calls them (*_routes.py), each declaring
its role where it is registered (collector/routing.py), around the shared pieces: typed
application keys (app_keys.py), middleware, request parameters (params.py), replies and
the mapping of domain errors to HTTP (replies.py), and the threads slow work runs on."""
