"""Computing steering vectors from activations captured inside the engine."""

from vsteer.methods.caa import mean_difference

__all__ = ["mean_difference"]
