"""Image classification through the same pipeline: data, models, the probe measurement, pixel editors, evaluation."""
