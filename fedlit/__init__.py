"""fedlit: federated prompt learning on CLIP, simulated fast."""
__version__ = "0.1.0"
