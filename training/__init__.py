"""Training stage: the article's CNN fitted on MNIST, exported to ONNX, verified, published."""
