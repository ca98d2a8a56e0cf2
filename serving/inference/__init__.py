"""The model core: served models, the dynamic batcher and the onnxruntime session.

Arrays in, arrays out, domain errors (serving.inference.errors) for whatever goes wrong.
No module here imports grpc, so a second transport can serve the same core.
"""
