"""The parts of stage 4 (pipelines.infer): planning, block work, journal, outputs, reporting."""
