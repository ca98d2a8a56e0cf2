"""The networks: the article's CNN, and the stronger variant the `best` recipe trains."""

from __future__ import annotations

import keras
from keras import layers

from core.contract import IMAGE_SHAPE, INPUT_NAME, NUM_CLASSES


def build_article_cnn(num_classes: int = NUM_CLASSES) -> keras.Model:
    """Exactly the article's network: 62,346 parameters."""
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, name=INPUT_NAME),
            layers.Conv2D(32, (5, 5), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (5, 5), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="article_cnn",
    )


def build_best_cnn(num_classes: int = NUM_CLASSES) -> keras.Model:
    """The article's two 5×5 conv/pool stages, grown for accuracy at nearly the same compute.

    Batch normalisation lets a large learning rate train fast; a 128-unit hidden
    layer with dropout replaces the direct softmax. The convolutions, where the
    CPU time goes, keep the article's sizes, so an epoch costs about the same.
    """
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, name=INPUT_NAME),
            layers.Conv2D(32, (5, 5), use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (5, 5), use_bias=False),
            layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dropout(0.25),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.4),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="best_cnn",
    )


ARCHITECTURES = {"article": build_article_cnn, "best": build_best_cnn}

# Written into metadata.json, so a published model says how it differs from the article's.
DESCRIPTIONS = {
    "article": "the article's: Conv2D(32,5x5,relu) > MaxPool(2) > Conv2D(64,5x5,relu) > MaxPool(2) > "
    "Flatten > Dense(10,softmax)",
    "best": "grown from the article's: Conv2D(32,5x5) > BatchNorm > relu > MaxPool(2) > Conv2D(64,5x5) > BatchNorm > "
    "relu > MaxPool(2) > Flatten > Dropout(0.25) > Dense(128,relu) > Dropout(0.4) > Dense(10,softmax)",
}
