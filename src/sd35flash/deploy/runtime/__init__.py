"""The deployment runtime: device presets, text encoders, quantization and the preset-aware loader."""
