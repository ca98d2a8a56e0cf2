"""The tensor contract between the trained model and everything that calls it, defined once.

The ONNX graph takes one input, `images`: float32 [N, 28, 28, 1] with pixels in [0, 1]
(uint8 pixels divided by 255), and gives one output, `probabilities`: float32 [N, classes].
Training exports to these names; serving, the clients, the load tests and the benchmark
read them from here.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE, 1)  # one image, channels last (Keras' layout)
PIXELS = IMAGE_SIDE * IMAGE_SIDE
INPUT_DTYPE = np.dtype(np.float32)
NUM_CLASSES = 10

# The KServe v2 datatypes the model accepts, and their wire layout (KServe's raw contents are
# little-endian). FP32 is the model's own input; UINT8 pixels are scaled by `scale_pixels`.
INPUT_DATATYPE = "FP32"
OUTPUT_DATATYPE = "FP32"
KSERVE_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(NUM_CLASSES)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}


def input_shape() -> list[int]:
    """The input's shape with the batch dimension left open (-1), as model metadata states it."""
    return [-1, *IMAGE_SHAPE]


def output_shape(num_classes: int = NUM_CLASSES) -> list[int]:
    return [-1, num_classes]


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 to float32 in [0, 1], any shape: the article's x / 255.

    A division (not a multiplication by 1/255), so training and serving agree bit for bit.
    """
    scaled = np.asarray(pixels).astype(np.float32)
    scaled /= np.float32(255.0)
    return scaled


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] to the model's input, float32 [N, 28, 28, 1] in [0, 1]."""
    return scale_pixels(images)[..., np.newaxis]
