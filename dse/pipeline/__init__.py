"""The whole pipeline: stage order and resumption, stage bookkeeping and the report."""
