"""Training's data: the local IDX copy (read by core.idx), else Keras' download.

Reading, checksumming and finding the files is core.idx's job, shared with the load tests and
the docker helpers; only the download lives here, because it needs Keras.
"""

from __future__ import annotations

import os

from core.contract import CLASS_NAMES, to_model_input  # noqa: F401  (re-exported for training's modules)
from core.idx import ENV_VARS, Dataset, DatasetError, find_data_dir, load_idx_dir, parse_idx  # noqa: F401


def load_dataset(dataset: str = "mnist", data_dir: str | os.PathLike | None = None) -> Dataset:
    """--data-dir, else the data set's environment variable, else the Debian folder, else Keras' download."""
    directory = find_data_dir(dataset, data_dir)
    if directory is not None:
        return load_idx_dir(directory, dataset)
    return _download(dataset)


def _download(dataset: str) -> Dataset:
    import keras  # imported here: TensorFlow is slow to import and the IDX path does not need it

    module = keras.datasets.mnist if dataset == "mnist" else keras.datasets.fashion_mnist
    try:
        (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as err:  # keras raises a bare Exception on a failed download
        raise DatasetError(
            f"could not download {dataset} ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"offline, pass --data-dir or set {ENV_VARS[dataset]} to a folder with the IDX files"
        ) from err
    return Dataset(
        dataset,
        CLASS_NAMES[dataset],
        x_train,
        y_train,
        x_test,
        y_test,
        source="keras.datasets download",
    )
