"""What training and serving agree on, and nothing else: the tensor contract, the typed
metadata.json, the model repository and the IDX data files. Imports numpy only: no
TensorFlow, no gRPC, no onnxruntime, so every image can carry it."""
