"""fedlora: federated LoRA fine-tuning on Flower."""

__version__ = "0.1.0"
