"""Stand-ins for the inference engines the operator launches, for tests on machines without a GPU."""
