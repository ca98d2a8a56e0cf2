"""The gRPC transport: thin servicers for mnist.v1 and KServe v2, converters between their
messages and the model core's arrays, and the one table of domain errors to status codes."""
