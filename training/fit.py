"""Fitting a network to a data set under a recipe, repeatably for a fixed seed."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from core.contract import NUM_CLASSES, to_model_input
from core.idx import Dataset
from training.config import TrainConfig
from training.model import ARCHITECTURES


@dataclass
class FitResult:
    model: keras.Model
    history: dict[str, list[float]]  # per epoch: loss, accuracy, val_loss, val_accuracy
    wall_seconds: float
    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float
    test_loss: float
    train_size: int
    val_size: int


def split_train_validation(images: np.ndarray, labels: np.ndarray, fraction: float):
    """Hold out the *last* `fraction` of the training set, as Keras' validation_split does."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--validation-split must be in [0, 1), got {fraction}")
    n_val = int(round(len(images) * fraction))
    cut = len(images) - n_val
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def _optimizer(config: TrainConfig, steps: int) -> keras.optimizers.Optimizer:
    recipe = config.recipe
    rate: float | keras.optimizers.schedules.LearningRateSchedule = recipe.learning_rate
    if recipe.schedule == "cosine":
        warmup = max(1, steps // 10)
        rate = keras.optimizers.schedules.CosineDecay(
            recipe.learning_rate / 10,
            decay_steps=steps - warmup,
            warmup_target=recipe.learning_rate,
            warmup_steps=warmup,
        )
    elif recipe.schedule != "constant":
        raise ValueError(f"unknown schedule '{recipe.schedule}'; use constant or cosine")
    optimizers = {
        "sgd": keras.optimizers.SGD,
        "adam": keras.optimizers.Adam,
        "rmsprop": keras.optimizers.RMSprop,
        "adamw": keras.optimizers.AdamW,
    }
    if recipe.optimizer not in optimizers:
        raise ValueError(
            f"unknown optimizer '{recipe.optimizer}'; choose one of {', '.join(optimizers)}"
        )
    return optimizers[recipe.optimizer](learning_rate=rate)


def _augmenter(seed: int) -> keras.Sequential:
    # Small enough that a digit stays itself (a rotated 6 must not become a 9).
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.04, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(0.08, fill_mode="constant", seed=seed + 2),
        ]
    )


def _training_data(x, y, config: TrainConfig):
    recipe = config.recipe
    if not recipe.augment:
        return x, y
    augment = _augmenter(config.seed)
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
        .batch(recipe.batch_size)
        .map(
            lambda images, labels: (augment(images, training=True), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def fit(config: TrainConfig, data: Dataset, verbose: int | None = None) -> FitResult:
    """Build the recipe's network and fit it; Keras' progress bar shows the way."""
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    recipe = config.recipe
    images, labels = data.train_images, data.train_labels
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    (x_train, y_train), (x_val, y_val) = split_train_validation(
        to_model_input(images),
        keras.utils.to_categorical(labels, NUM_CLASSES),
        config.validation_split,
    )
    x_test, y_test = (
        to_model_input(data.test_images),
        keras.utils.to_categorical(data.test_labels, NUM_CLASSES),
    )

    model = ARCHITECTURES[recipe.architecture](len(data.class_names))
    steps = recipe.epochs * -(-len(x_train) // recipe.batch_size)
    model.compile(
        optimizer=_optimizer(config, steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    history = model.fit(
        _training_data(x_train, y_train, config),
        None if recipe.augment else y_train,
        batch_size=None if recipe.augment else recipe.batch_size,
        epochs=recipe.epochs,
        validation_data=(x_val, y_val) if len(x_val) else None,
        verbose=verbose,
    )
    wall = time.perf_counter() - started
    test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    # Training accuracy measured on the un-augmented training images, in inference mode.
    _, train_accuracy = model.evaluate(x_train, y_train, batch_size=1000, verbose=0)
    val_accuracy = history.history["val_accuracy"][-1] if len(x_val) else None
    return FitResult(
        model=model,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        wall_seconds=wall,
        train_accuracy=float(train_accuracy),
        val_accuracy=None if val_accuracy is None else float(val_accuracy),
        test_accuracy=float(test_accuracy),
        test_loss=float(test_loss),
        train_size=len(x_train),
        val_size=len(x_val),
    )
