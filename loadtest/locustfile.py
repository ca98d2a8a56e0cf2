"""Locust users that call mnist-serve over gRPC with real MNIST test digits.

    locust -f loadtest/locustfile.py --host 127.0.0.1:8500 --scenario mix --mix-weights 6,3,1

Scenarios (`--scenario`, also settable in the web UI):
  single  one image per call through mnist.v1 Classify
  batch   --images-per-call images per Classify call (default 16)
  kserve  one image per call through KServe v2 ModelInfer
  rest    one image per call through KServe v2 over HTTP/REST (--http-host; binary tensor data)
  mix     single, batch and kserve weighted by --mix-weights single,batch,kserve (default 6,3,1);
          a fourth weight mixes in rest calls, e.g. --mix-weights 6,3,1,2

Every call is reported through Locust's request event, so its statistics, charts, CSV and
HTML report count gRPC calls the way they count HTTP requests. `--traceparent per-call`
sends each call a fresh W3C traceparent (a trace of its own, in the request event's context
as `trace_id`, and logged for a failed call); `--traceparent <value>` sends one on every call. `make loadtest`
(python -m loadtest.run) starts a server and runs this file headless. The `loadtest` and
`core` packages must be importable (installed, or Locust started from the project's root).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from pathlib import Path

import gevent

# grpcio's own threads block the gevent loop unless grpc cooperates with gevent: without this,
# one user waiting on a reply stalls every other user in the process (8 users then keep a single
# call in flight, and the latencies look better than any real client would see). It has to run
# before any channel is created, so here, at import, before Locust starts a single user.
import grpc  # noqa: E402  (after locust, which monkey-patches the interpreter)
import grpc.experimental.gevent as grpc_gevent  # noqa: E402
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402

from core.idx import find_data_dir, load_idx_dir  # noqa: E402
from loadtest.locust_runner import (  # noqa: E402
    LoadTestError,
    batch_request_name,
    kserve_request_name,
    normalize_target,
    parse_mix_weights,
    rest_request_name,
    single_request_name,
)
from loadtest.options import DEFAULTS, SCENARIOS  # noqa: E402
from serving import tracing  # noqa: E402
from serving.client import ClassifierClient, client_security  # noqa: E402
from serving.rest_client import RestClient, RestError  # noqa: E402  (http.client: cooperative once patched)

log = logging.getLogger("mnist-loadtest")


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    # On the parser itself: Locust's include_in_web_ui works there, not on argument groups.
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=DEFAULTS.scenario,
        include_in_web_ui=True,
        help="single: 1 image per Classify call; batch: --images-per-call per Classify call; "
        f"kserve: KServe v2 ModelInfer; mix: all three by --mix-weights (default: {DEFAULTS.scenario})",
    )
    parser.add_argument(
        "--images-per-call",
        type=int,
        default=DEFAULTS.images_per_call,
        include_in_web_ui=True,
        help=f"images in each call of the batch scenario (default: {DEFAULTS.images_per_call})",
    )
    parser.add_argument(
        "--mix-weights",
        default=DEFAULTS.mix_weights_text,
        include_in_web_ui=True,
        help="relative weights of single,batch,kserve calls in the mix scenario "
        f"(default: {DEFAULTS.mix_weights_text})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=DEFAULTS.pool_size,
        include_in_web_ui=True,
        help="how many of the first MNIST test images to screen for the load pool "
        f"(default: {DEFAULTS.pool_size})",
    )
    parser.add_argument(
        "--rpc-timeout",
        type=float,
        default=DEFAULTS.rpc_timeout,
        include_in_web_ui=True,
        help=f"deadline of each gRPC call in seconds (default: {DEFAULTS.rpc_timeout:g})",
    )
    parser.add_argument(
        "--http-host",
        default="",
        include_in_web_ui=True,
        help="host:port of the server's KServe v2 REST API for the rest scenario "
        "(default: --host's host, port 8000)",
    )
    parser.add_argument(
        "--model-name",
        default="",
        include_in_web_ui=True,
        help="the model every call asks for (default: the server's default model)",
    )
    parser.add_argument(
        "--model-version",
        default="",
        include_in_web_ui=True,
        help="the version every call asks for (default: the newest ready one, which may change "
        "under load; each answer is judged against the version that computed it)",
    )
    parser.add_argument(
        "--mnist-dir",
        default=os.environ.get("MNIST_DATA_DIR", ""),
        include_in_web_ui=False,
        help="folder of the MNIST IDX files (default: $MNIST_DATA_DIR, else ../shared/datasets/mnist)",
    )
    # Servers with --tls-cert, --tls-client-ca or --auth-token-file (every scenario, rest included).
    parser.add_argument(
        "--tls",
        action="store_true",
        default=False,
        include_in_web_ui=False,
        help="connect with TLS, trusting the system's CAs",
    )
    parser.add_argument(
        "--tls-ca",
        default="",
        include_in_web_ui=False,
        help="PEM CA of the server's certificate (implies --tls)",
    )
    # Not --tls-cert/--tls-key: Locust has those already (HTTPS for its web UI), and a second definition
    # makes this whole handler fail, so none of these options would exist.
    parser.add_argument(
        "--client-tls-cert",
        default="",
        include_in_web_ui=False,
        help="PEM client certificate (mTLS)",
    )
    parser.add_argument(
        "--client-tls-key", default="", include_in_web_ui=False, help="PEM key of --client-tls-cert"
    )
    parser.add_argument(
        "--auth-token-file",
        default="",
        include_in_web_ui=False,
        help="file holding the server's bearer token",
    )
    parser.add_argument(
        "--traceparent",
        default="",
        include_in_web_ui=False,
        help="W3C trace context for servers that trace: per-call (a new sampled trace "
        "for every call, its id logged when the call fails) or one traceparent "
        "for every call; empty: none",
    )


def _security(options) -> dict:
    """The clients' tls and token (ClassifierClient's and RestClient's) from the TLS and token options
    (absent options: plaintext)."""
    tls, token = client_security(
        getattr(options, "tls", False),
        getattr(options, "tls_ca", ""),
        getattr(options, "client_tls_cert", ""),
        getattr(options, "client_tls_key", ""),
        getattr(options, "auth_token_file", ""),
    )
    return {"tls": tls, "token": token}


# --- the load pool -----------------------------------------------------------------------------
#
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
    images: np.ndarray | None = None  # uint8 [P, 28, 28]
    labels: np.ndarray | None = (
        None  # int64 [P]: the true label, which the idle server also answered
    )
    key: tuple | None = (
        None  # (target, pool size, MNIST folder, model, version) the pool was built for
    )
    max_batch_size: int = 0  # the most images the server accepts per call
    model_name: str = ""  # what the calls ask for: --model-name, else the server's default model
    model_version: str = ""  # --model-version; empty: the newest ready one
    answers: dict[tuple[str, str], np.ndarray] = {}  # (model, version) -> its labels for the pool
    lock = BoundedSemaphore()  # one build at a time (init and test_start may overlap on a worker)
    screening = BoundedSemaphore()  # one version screened at a time


_SCREEN_BATCH = 250  # images per screening call (fewer when the server accepts fewer)
_SCREEN_CONCURRENCY = 8


def _mnist_dir(configured: str) -> Path:
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
                _mnist_dir(options.mnist_dir),
                options.pool_size,
                options.rpc_timeout,
                _security(options),
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


def _prepare_or_report(environment) -> bool:
    try:
        prepare(environment)
        return True
    except (LoadTestError, OSError, ValueError, grpc.RpcError) as error:
        message = (
            f"{error.code().name}: {error.details()}"
            if isinstance(error, grpc.RpcError)
            else str(error)
        )
        log.error("cannot start the load test against %s: %s", environment.host, message)
        LoadPool.images = None
        return False


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    # Headless, the host is known now: build the pool before Locust's --run-time clock starts, so
    # that screening does not eat into the measured window (test_start then reuses it).
    options = environment.parsed_options
    if (
        options is not None
        and options.headless
        and environment.host
        and not isinstance(environment.runner, MasterRunner)
    ):
        _prepare_or_report(environment)


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    if isinstance(environment.runner, MasterRunner):
        return  # only the processes that run users need images (each worker builds its own pool)
    if not _prepare_or_report(environment):
        environment.process_exit_code = 3
        if type(environment.runner).__name__ == "LocalRunner":
            gevent.spawn(environment.runner.quit)  # nothing to test: end the run instead of idling


@events.quitting.add_listener
def _write_final_csv(environment, **_kwargs) -> None:
    """Rewrite the stats and failures CSVs with the final numbers.

    Locust rewrites them once a second while it runs, so their last version misses the calls of
    the final second, failures included; run.py and the batching study read these files.
    """
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix or isinstance(environment.runner, WorkerRunner):
        return
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", writer.requests_csv),
        ("_failures.csv", writer.failures_csv),
    ):
        with open(f"{prefix}{suffix}", "w", newline="") as handle:
            write(csv.writer(handle))


class WrongPrediction(Exception):
    """The server answered a pool image with a label other than the one it gave when idle."""


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


def _check(name: str, served: np.ndarray, expected: np.ndarray | None) -> Exception | None:
    if expected is None:
        return None
    if served.shape != expected.shape:
        return WrongPrediction(f"{name}: {len(served)} predictions for {len(expected)} images")
    if np.array_equal(served, expected):
        return None
    # One message per request name, so that Locust's failure table groups them into one row.
    return WrongPrediction(
        f"{name}: wrong prediction under load: a digit other than the one the server "
        "answered for the same image when idle"
    )


class MnistGrpcUser(User):
    """One simulated client: its own gRPC channel, calls back to back (no think time)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.client = None
        if LoadPool.images is None:
            return  # the pool could not be built (test_start logged why): the first task stops this user
        options = self.environment.parsed_options
        self.target = normalize_target(self.environment.host or "")
        self.traceparent = ""  # the last one sent (--traceparent)
        trace = self._trace_headers(getattr(options, "traceparent", ""))
        self.client = ClassifierClient(
            self.target, timeout=options.rpc_timeout, **_security(options), **trace
        )
        self.images_per_call = max(1, int(options.images_per_call))
        calls = {
            "single": self.call_single,
            "batch": self.call_batch,
            "kserve": self.call_kserve,
            "rest": self.call_rest,
        }
        self.rest = RestClient(
            _http_host(options.http_host, self.target),
            timeout=options.rpc_timeout,
            **_security(options),
            **trace,
        )
        if options.scenario == "mix":
            weights = parse_mix_weights(options.mix_weights)
            self.plan = [
                (calls[key], w)
                for key, w in zip(("single", "batch", "kserve", "rest"), weights)
                if w > 0
            ]
        else:
            self.plan = [(calls[options.scenario], 1)]
        self.plan_calls = [call for call, _ in self.plan]
        self.plan_weights = [weight for _, weight in self.plan]

    def _trace_headers(self, option: str) -> dict:
        """The clients' traceparent (--traceparent): none, a fresh one per call, or a fixed one."""
        if not option:
            return {}
        if option != "per-call":
            self.traceparent = tracing.check_traceparent(option)
            return {"traceparent": self.traceparent}

        def fresh() -> str:
            self.traceparent = tracing.new_traceparent()
            return self.traceparent

        return {"traceparent": fresh}

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.rest.close()
            self.client = None

    @task
    def call(self) -> None:
        if self.client is None:
            raise StopUser()
        random.choices(self.plan_calls, weights=self.plan_weights)[0]()

    # --- the three kinds of call -------------------------------------------------------------

    def _pick(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Random pool images, and their indices in the pool."""
        index = np.random.randint(0, len(LoadPool.images), size=count)
        return LoadPool.images[index], index

    def _expected(
        self, model_name: str, model_version: str, index: np.ndarray
    ) -> np.ndarray | None:
        return expected_labels(self.client, model_name, model_version, index)

    def call_single(self) -> None:
        self._classify(single_request_name(), 1)

    def call_batch(self) -> None:
        self._classify(batch_request_name(self.images_per_call), self.images_per_call)

    def _classify(self, name: str, count: int) -> None:
        images, index = self._pick(count)
        start = time.perf_counter()
        length, error = 0, None
        try:
            result = self.client.classify(images, LoadPool.model_name, LoadPool.model_version)
            length = result.response_bytes
            error = _check(
                name, result.labels, self._expected(result.model_name, result.model_version, index)
            )
        except grpc.RpcError as rpc_error:
            error = _rpc_failure(rpc_error)
        self._report(name, start, length, error)

    def call_kserve(self) -> None:
        name = kserve_request_name()
        images, index = self._pick(1)
        start = time.perf_counter()
        length, error = 0, None
        try:
            answer = self.client.infer_kserve_answer(
                images, LoadPool.model_name, LoadPool.model_version
            )
            length = answer.probabilities.nbytes
            error = _check(
                name,
                answer.probabilities.argmax(axis=-1),
                self._expected(answer.model_name, answer.model_version, index),
            )
        except grpc.RpcError as rpc_error:
            error = _rpc_failure(rpc_error)
        except ValueError as bad_reply:  # e.g. an output of the wrong type or shape
            error = bad_reply
        self._report(name, start, length, error)

    def call_rest(self) -> None:
        name = rest_request_name()
        images, index = self._pick(1)
        start = time.perf_counter()
        length, error = 0, None
        try:
            probabilities, model_name, model_version = self.rest.infer_answer(
                images, LoadPool.model_name, LoadPool.model_version
            )
            length = probabilities.nbytes
            error = _check(
                name,
                probabilities.argmax(axis=-1),
                self._expected(model_name, model_version, index),
            )
        except (
            RestError,
            OSError,
            ValueError,
        ) as failure:  # an HTTP error, a dropped connection, a bad reply
            error = failure
        self._report(name, start, length, error, request_type="http")

    def _report(
        self,
        name: str,
        start: float,
        length: int,
        error: Exception | None,
        request_type: str = "grpc",
    ) -> None:
        context = {"target": self.target}
        if self.traceparent:
            context["trace_id"] = self.traceparent.split("-")[1]
            if error is not None:
                log.warning("%s failed (trace id %s): %s", name, context["trace_id"], error)
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=error,
            context=context,
        )


def _http_host(configured: str, grpc_target: str) -> str:
    """--http-host, else the gRPC host on mnist-serve's default HTTP port."""
    return configured or f"{grpc_target.rpartition(':')[0]}:8000"


class GrpcCallFailed(Exception):
    pass


def _rpc_failure(error: grpc.RpcError) -> Exception:
    """The status code and details only, so that Locust groups identical failures together."""
    code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return GrpcCallFailed(f"{code}: {details}")
