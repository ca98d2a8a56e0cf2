"""The article's network: its shapes and parameters, the Keras summary, and one seed, one model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from core.idx import load_idx_dir
from tests.support.common import ROOT


def test_article_network_shapes_and_parameters():
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from training.model import build_article_cnn

    model = build_article_cnn()
    shapes = [tuple(layer.output.shape) for layer in model.layers]
    params = [layer.count_params() for layer in model.layers]
    assert shapes == [
        (None, 24, 24, 32),
        (None, 12, 12, 32),
        (None, 8, 8, 64),
        (None, 4, 4, 64),
        (None, 1024),
        (None, 10),
    ]
    assert params == [832, 0, 51264, 0, 0, 10250]
    assert model.count_params() == 62346


def test_summary_flag_prints_the_keras_summary():
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "--summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "62,346" in result.stdout and "(None, 8, 8, 64)" in result.stdout
    assert result.stderr.strip() == "", "TensorFlow's import chatter must not reach the user"


def test_summary_table_lines_up():
    from training.cli import summary_table

    table = summary_table([("recipe", "article"), ("test accuracy", "0.9704")]).splitlines()
    assert table[1] == "recipe        | article" and table[2] == "test accuracy | 0.9704"
    assert table[0] == table[-1] and set(table[0]) == {"-"}


def test_same_seed_same_model(mnist_path):
    from training.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from training.config import make_config
    from training.fit import fit

    data = load_idx_dir(mnist_path)
    config = make_config("article", {"epochs": 1}, limit=1000, seed=7)
    first, second = fit(config, data, verbose=0), fit(config, data, verbose=0)
    assert first.test_accuracy == second.test_accuracy
    for a, b in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(a, b)
