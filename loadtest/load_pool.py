"""The load pool: the MNIST test images the idle server classifies right, and each model
version's own answers for them, against which every answer under load is judged.

Imported by the locustfile after grpc has been made gevent-cooperative (its screening calls run
on greenlets).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool

from core.idx import find_data_dir, load_idx_dir
from loadtest.locust_args import LoadTestError, normalize_target, parse_mix_weights
from loadtest.locust_options import security
from serving import tracing
from serving.client import ClassifierClient

log = logging.getLogger("mnist-loadtest")

# A small model is not 100 % accurate, so "the served label differs from the true label" would
# count the model's honest mistakes as failures of the service. Instead, once at test start, the
# server classifies the first --pool-size test images while it is idle, and only the images whose
# served label equals the true label go into the pool. Under load, a wrong answer for a pool image
# therefore means the server returned something other than its own idle answer (a batching mix-up,
# a corrupted tensor, a race): that is the correctness signal, and each one is a Locust failure.
#
# A server that polls its repository may switch to a new version mid-run, whose honest answers
# differ from the old one's. Every answer names the version that computed it, so each answer is
# judged against that version's own answers for the pool: a version met for the first time is
# screened once (the whole pool, naming the version), and its answers become its reference.


class LoadPool:
    """The one pool of this process, shared by its users (class attributes, set by `prepare`)."""

    images: np.ndarray | None = None  # uint8 [P, 28, 28]
    # int64 [P]: the true label, which the idle server also answered
    labels: np.ndarray | None = None
    # (target, pool size, MNIST folder, model, version) the pool was built for
    key: tuple | None = None
    max_batch_size: int = 0  # the most images the server accepts per call
    model_name: str = ""  # what the calls ask for: --model-name, else the server's default model
    model_version: str = ""  # --model-version; empty: the newest ready one
    answers: dict[tuple[str, str], np.ndarray] = {}  # (model, version) -> its labels for the pool
    lock = BoundedSemaphore()  # one build at a time (init and test_start may overlap on a worker)
    screening = BoundedSemaphore()  # one version screened at a time


_SCREEN_BATCH = 250  # images per screening call (fewer when the server accepts fewer)
_SCREEN_CONCURRENCY = 8


def mnist_dir(configured: str) -> Path:
    """--mnist-dir, else $MNIST_DATA_DIR, else the shared copy beside the project."""
    return (
        find_data_dir("mnist", configured)
        or Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
    )


def screen(
    client: ClassifierClient, images: np.ndarray, model_name: str, model_version: str, limit: int
) -> np.ndarray:
    """The labels that (model_name, model_version) gives `images`, in calls of at most `limit` images."""
    served = np.empty(len(images), dtype=np.int64)
    step = min(_SCREEN_BATCH, limit)

    def one_call(start: int) -> None:
        served[start : start + step] = client.classify(
            images[start : start + step], model_name, model_version
        ).labels

    # Several calls in flight (greenlets), so that a server with batching off screens quickly too.
    Pool(_SCREEN_CONCURRENCY).map(one_call, range(0, len(images), step))
    return served


def build_pool(
    target: str,
    mnist_dir: Path,
    pool_size: int,
    timeout: float,
    security: dict | None = None,
    model_name: str = "",
    model_version: str = "",
) -> tuple[np.ndarray, np.ndarray, int]:
    """The pool images, their labels and the server's per-call image limit; records the model's answers."""
    data = load_idx_dir(mnist_dir)
    images = np.ascontiguousarray(data.test_images[:pool_size], dtype=np.uint8)
    truth = np.asarray(data.test_labels[:pool_size], dtype=np.int64)
    with ClassifierClient(target, timeout=timeout, **(security or {})) as client:
        model = client.describe(model_name, model_version)
        limit = model.max_batch_size or _SCREEN_BATCH  # the server refuses calls with more images
        log.info(
            "server: model %s version %s on %s, at most %d images per call",
            model.model_name,
            model.model_version,
            model.execution_provider or "?",
            limit,
        )
        served = screen(client, images, model.model_name, model.model_version, limit)
    LoadPool.model_name, LoadPool.model_version = model.model_name, model_version
    keep = served == truth
    LoadPool.answers = {(model.model_name, model.model_version): truth[keep]}
    if not keep.any():
        raise LoadTestError(
            f"the server got none of the first {len(images)} test images right; "
            "is the model in the repository trained?"
        )
    log.info(
        "load pool: %d of the first %d MNIST test images, the ones the idle server classifies correctly "
        "(%.1f %%)",
        int(keep.sum()),
        len(images),
        100.0 * keep.mean(),
    )
    return images[keep], truth[keep], limit


def prepare(environment) -> None:
    """Check the options and build the load pool for environment.host (reused when already built)."""
    options = environment.parsed_options
    target = normalize_target(environment.host or "")
    weights = parse_mix_weights(options.mix_weights) if options.scenario == "mix" else None
    if options.images_per_call < 1 or options.pool_size < 1:
        raise LoadTestError("--images-per-call and --pool-size must be at least 1")
    if getattr(options, "traceparent", "") not in ("", "per-call"):
        tracing.check_traceparent(options.traceparent)  # ValueError: reported, and nothing runs
    model_name, model_version = (
        getattr(options, "model_name", ""),
        getattr(options, "model_version", ""),
    )
    key = (target, options.pool_size, options.mnist_dir, model_name, model_version)
    with LoadPool.lock:
        if LoadPool.images is None or LoadPool.key != key:
            LoadPool.images = None
            images, labels, LoadPool.max_batch_size = build_pool(
                target,
                mnist_dir(options.mnist_dir),
                options.pool_size,
                options.rpc_timeout,
                security(options),
                model_name,
                model_version,
            )
            LoadPool.images, LoadPool.labels, LoadPool.key = images, labels, key
    batch_calls = options.scenario == "batch" or (weights is not None and weights[1] > 0)
    if batch_calls and options.images_per_call > LoadPool.max_batch_size:
        raise LoadTestError(
            f"--images-per-call {options.images_per_call} is more than the server accepts per "
            f"call (its max batch size is {LoadPool.max_batch_size}); lower it or use "
            "--scenario single"
        )


def expected_labels(
    client: ClassifierClient, model_name: str, model_version: str, index: np.ndarray
) -> np.ndarray | None:
    """What (model_name, model_version) answers for the pool images `index`; None: it cannot be known.

    A version met for the first time is screened once; one that left before it could be (a short
    overlap during a switch) is not judged.
    """
    key = (model_name, model_version)
    if key not in LoadPool.answers:
        with LoadPool.screening:
            if key not in LoadPool.answers:
                try:
                    LoadPool.answers[key] = screen(
                        client, LoadPool.images, model_name, model_version, LoadPool.max_batch_size
                    )
                except grpc.RpcError as error:
                    log.warning(
                        "cannot screen %s version %s (%s): its answers go unjudged",
                        model_name,
                        model_version,
                        error.code().name,
                    )
                    return None
                log.info(
                    "screened %s version %s: its answers are judged against its own",
                    model_name,
                    model_version,
                )
    return LoadPool.answers[key][index]
