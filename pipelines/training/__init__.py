"""The parts of stage 3 (training): config, data, normalization, module, tracking, registry."""
