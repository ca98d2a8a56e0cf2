"""gRPC serving of the MNIST CNN."""
