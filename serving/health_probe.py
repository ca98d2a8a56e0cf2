"""`mnist-health-probe`: exit 0 when the server's grpc.health.v1 says SERVING (container healthchecks)."""
from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-health-probe", description=__doc__)
    parser.add_argument("--target", default="localhost:8500", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service to ask about ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as err:
        print(f"{args.target}: unhealthy: {err.code().name}: {err.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
