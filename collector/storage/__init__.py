"""The store: the ``Store`` role protocols and records (the seam), and under sql/ the
SQLite and PostgreSQL backends that implement them."""
