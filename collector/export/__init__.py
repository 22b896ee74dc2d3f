"""Export of measurement data to Parquet/CSV for analysts and open data."""
