"""The collector process: the web application assembled, its workers, and a test harness."""
