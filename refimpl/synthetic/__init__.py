"""Random-weight checkpoints in the exact official format, with realistic weight scales."""
