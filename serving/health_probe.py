"""`mnist-health-probe`: exit 0 when the server's grpc.health.v1 says SERVING (container healthchecks).

With TLS on the server (--tls-cert), give --tls-ca (and, for mTLS, --tls-cert/--tls-key): Kubernetes'
own gRPC probes speak plaintext only, so a TLS server is probed with this command (an exec probe).
Health needs no token.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-health-probe", description=__doc__)
    parser.add_argument("--target", default="localhost:8500", help="host:port of the gRPC server")
    parser.add_argument(
        "--service", default="", help="service to ask about ('' = the whole server)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate: probe over TLS")
    parser.add_argument(
        "--tls-cert", help="PEM client certificate, for a server that requires mTLS"
    )
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-server-name", help="the name in the server's certificate, when not the target's host"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        channel = _channel(args)
    except (OSError, ValueError) as err:
        print(f"{args.target}: cannot probe: {err}")
        return 1
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as err:
        print(f"{args.target}: unhealthy: {err.code().name}: {err.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.target)
    from serving.client import ClientTls  # the TLS path only: plaintext probes stay light

    tls = ClientTls(
        ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
    )
    options = (
        [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    )
    return grpc.secure_channel(args.target, tls.credentials(), options=options)


if __name__ == "__main__":
    sys.exit(main())
