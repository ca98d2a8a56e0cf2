"""`mnist-serve`'s argument parser: one function per group of flags, each flag also an
environment variable (MNIST_SERVE_<FLAG>); serving.config.load_config turns them into a
`ServeConfig`."""

from __future__ import annotations

import argparse
import os

from serving import flag_groups
from serving.config import ENV_PREFIX, ServeConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-serve",
        description="Serve the MNIST CNN over gRPC (mnist.v1.Classifier and KServe v2 "
        "inference.GRPCInferenceService) with dynamic batching on onnxruntime. "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>, "
        f"e.g. {ENV_PREFIX}MAX_BATCH_SIZE=32.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = ServeConfig()
    flag_groups.add_model_flags(parser, d)
    flag_groups.add_network_flags(parser, d)
    flag_groups.add_slow_client_flags(parser, d)
    flag_groups.add_batching_flags(parser, d)
    flag_groups.add_runtime_flags(parser, d)
    flag_groups.add_limit_flags(parser, d)
    flag_groups.add_security_flags(parser, d)
    flag_groups.add_payload_log_flags(parser, d)
    flag_groups.add_tracing_flags(parser, d)
    flag_groups.add_log_flags(parser, d)
    return parser


def apply_environment(
    parser: argparse.ArgumentParser, environ: dict[str, str] | None = None
) -> None:
    """Let MNIST_SERVE_<FLAG> set each flag's default; the command line still wins."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse converts string defaults with the action's type
        value = environ.get(ENV_PREFIX + action.dest.upper())
        if value not in (None, "") and action.dest != "help":
            if action.choices and value not in action.choices:
                raise ValueError(
                    f"{ENV_PREFIX}{action.dest.upper()}={value}: choose one of {', '.join(action.choices)}"
                )
            action.default = value
