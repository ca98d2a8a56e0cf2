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
import random
import time

import gevent

# grpcio's own threads block the gevent loop unless grpc cooperates with gevent: without this,
# one user waiting on a reply stalls every other user in the process (8 users then keep a single
# call in flight, and the latencies look better than any real client would see). It has to run
# before any channel is created, so here, at import, before Locust starts a single user.
import grpc  # noqa: E402  (after locust, which monkey-patches the interpreter)
import grpc.experimental.gevent as grpc_gevent  # noqa: E402
from locust import User, constant, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402

from loadtest.load_pool import LoadPool, expected_labels, prepare  # noqa: E402
from loadtest.locust_args import (  # noqa: E402
    LoadTestError,
    batch_request_name,
    kserve_request_name,
    normalize_target,
    parse_mix_weights,
    rest_request_name,
    single_request_name,
)
from loadtest.locust_options import add_arguments, http_host, security  # noqa: E402
from serving import tracing  # noqa: E402
from serving.client import ClassifierClient  # noqa: E402
from serving.rest_client import RestClient, RestError  # noqa: E402  (http.client: cooperative once patched)

log = logging.getLogger("mnist-loadtest")

# The locustfile's own options, added when Locust builds its parser (after importing this file).
events.init_command_line_parser.add_listener(add_arguments)


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
            self.target, timeout=options.rpc_timeout, **security(options), **trace
        )
        self.images_per_call = max(1, int(options.images_per_call))
        calls = {
            "single": self.call_single,
            "batch": self.call_batch,
            "kserve": self.call_kserve,
            "rest": self.call_rest,
        }
        self.rest = RestClient(
            http_host(options.http_host, self.target),
            timeout=options.rpc_timeout,
            **security(options),
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


class GrpcCallFailed(Exception):
    pass


def _rpc_failure(error: grpc.RpcError) -> Exception:
    """The status code and details only, so that Locust groups identical failures together."""
    code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return GrpcCallFailed(f"{code}: {details}")
