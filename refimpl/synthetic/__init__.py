"""Random-weight checkpoints in the exact official format, with realistic weight scales, and the
small BPE tokenizer they carry."""
