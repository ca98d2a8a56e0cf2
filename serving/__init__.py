"""gRPC serving of the MNIST CNN."""

__version__ = "0.1.0"
