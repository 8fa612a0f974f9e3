"""Dataset statistics, automatic scale, and comparisons of finished runs."""
