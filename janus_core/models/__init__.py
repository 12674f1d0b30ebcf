"""Models: loading both checkpoint layouts and JanusFlow, the networks transformers lacks, device and compat shims."""
