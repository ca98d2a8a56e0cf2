"""The locustfile's own Locust options (`--scenario`, `--pool-size`, TLS, ...), and the
clients' settings read from them.

Locust adds these through its init_command_line_parser event, which the locustfile subscribes
`add_arguments` to. Defaults come from loadtest/options.py, shared with `python -m loadtest.run`.
"""

from __future__ import annotations

import os

from loadtest.options import DEFAULTS, SCENARIOS
from serving.client_channel import client_security


def add_arguments(parser) -> None:
    """Every option of the locustfile, in the order Locust's --help lists them."""
    # On the parser itself: Locust's include_in_web_ui works there, not on argument groups.
    _add_load_arguments(parser)
    _add_target_arguments(parser)
    _add_security_arguments(parser)


def _add_load_arguments(parser) -> None:
    """The scenario and its calls."""
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


def _add_target_arguments(parser) -> None:
    """Where the calls go, which model they ask for, and where the pool's images come from."""
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


def _add_security_arguments(parser) -> None:
    """TLS, mTLS, the bearer token and the trace context of the calls."""
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


def security(options) -> dict:
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


def http_host(configured: str, grpc_target: str) -> str:
    """--http-host, else the gRPC host on mnist-serve's default HTTP port."""
    return configured or f"{grpc_target.rpartition(':')[0]}:8000"
