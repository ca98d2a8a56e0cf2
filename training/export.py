"""Keras → ONNX with tf2onnx, named and annotated for the model repository."""

from __future__ import annotations

import json

import keras
import onnx
import tensorflow as tf
import tf2onnx

from core.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME


def export_onnx(model: keras.Model, metadata: dict[str, str], opset: int = 17) -> onnx.ModelProto:
    """Convert `model` to ONNX: input `images` float32 [batch,28,28,1], output `probabilities` [batch,10].

    tf2onnx's `from_keras` fails on Keras 3, so the model is traced as a
    `tf.function` with an explicit signature (batch left dynamic) and converted.
    """
    signature = (tf.TensorSpec((None, *IMAGE_SHAPE), tf.float32, name=INPUT_NAME),)

    @tf.function(input_signature=signature)
    def serve(images):
        return model(images, training=False)

    onnx_model, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    _rename_io(onnx_model.graph)
    del onnx_model.metadata_props[:]
    for key, value in metadata.items():
        onnx_model.metadata_props.add(
            key=key, value=value if isinstance(value, str) else json.dumps(value)
        )
    onnx_model.doc_string = (
        "MNIST CNN (article: 'Convolutional Neural Networks for Beginners'), exported with tf2onnx"
    )
    onnx.checker.check_model(onnx_model)
    return onnx_model


def _rename_io(graph: onnx.GraphProto) -> None:
    """Give the graph's single input and output the repository's names (tf2onnx appends ':0' and such)."""
    renames = {graph.input[0].name: INPUT_NAME, graph.output[0].name: OUTPUT_NAME}
    for value in (*graph.input, *graph.output):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
