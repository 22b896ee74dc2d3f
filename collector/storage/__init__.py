"""The store: the ``Store`` role protocols and their SQLite and PostgreSQL backends."""
