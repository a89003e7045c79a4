"""mscnn: learning across scales — the method in plain PyTorch (no Ray, no MLflow)."""

__version__ = "0.1.0"
