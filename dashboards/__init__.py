"""Dashboards: statistics and comparisons read from recorded runs."""
