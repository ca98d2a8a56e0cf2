"""What arrives on the wire, made into model input: `wire` checks tensors and raw contents,
`framing` turns PNG/JPEG files into MNIST-framed digits. Pure functions, no grpc."""
