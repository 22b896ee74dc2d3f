"""Reports for analysts: the queries over a store, and their text, CSV, JSON and HTML forms."""
