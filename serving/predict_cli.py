"""`mnist-predict`: classify PNG/JPEG files, or the first N MNIST test images, on a running server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from serving import tracing
from serving.client import ClassifierClient
from serving.client_channel import client_security
from serving.rest_client import RestClient, RestError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-predict",
        description="Send images to mnist-serve and print its predictions "
        "(and the accuracy when the true labels are known).",
    )
    _add_request_flags(parser)
    _add_security_flags(parser)
    _add_tracing_flags(parser)
    return parser


def _add_request_flags(parser: argparse.ArgumentParser) -> None:
    """What to send, where, through which API, and how to print the answers."""
    parser.add_argument("images", nargs="*", type=Path, help="PNG or JPEG files of digits")
    parser.add_argument(
        "--target",
        help="host:port of the server (default: localhost:8500 for gRPC, "
        "localhost:8000 for --api rest)",
    )
    parser.add_argument(
        "--mnist-test",
        type=int,
        metavar="N",
        help="send the first N MNIST test images instead of files",
    )
    parser.add_argument(
        "--data-dir", help="folder of the MNIST IDX files (default: $MNIST_DATA_DIR)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per call")
    parser.add_argument(
        "--api",
        choices=["classifier", "kserve", "rest"],
        default="classifier",
        help="mnist.v1.Classifier, the KServe v2 ModelInfer over gRPC, or KServe v2 over "
        "HTTP/REST (files then go through the page's /api/classify)",
    )
    parser.add_argument(
        "--model-name",
        default="",
        help="the model to ask (default: the server's default model; mnist for KServe v2)",
    )
    parser.add_argument(
        "--model-version", default="", help="the version to ask (default: the newest ready one)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    security = parser.add_argument_group(
        "security (every API; servers run with --tls-cert, --tls-client-ca, --auth-token-file)"
    )
    security.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    security.add_argument(
        "--tls-ca", help="PEM CA that signed the server's certificate (implies --tls)"
    )
    security.add_argument(
        "--tls-cert", help="PEM client certificate, for servers that require mTLS"
    )
    security.add_argument("--tls-key", help="PEM private key of --tls-cert")
    security.add_argument("--auth-token-file", help="file holding the server's bearer token")


def _add_tracing_flags(parser: argparse.ArgumentParser) -> None:
    trace = parser.add_argument_group("tracing (servers run with --trace-mode opentelemetry)")
    trace.add_argument(
        "--traceparent",
        metavar="TRACEPARENT|new",
        help="send this W3C traceparent with every call, so the server's spans join "
        "your trace; new: start a trace for this run (its id is printed on stderr)",
    )
    trace.add_argument("--tracestate", help="the W3C tracestate sent beside --traceparent")


def _trace_headers(args: argparse.Namespace) -> dict:
    """The clients' traceparent and tracestate from --traceparent / --tracestate."""
    if not args.traceparent:
        return {}
    traceparent = tracing.new_traceparent() if args.traceparent == "new" else args.traceparent
    print(
        f"trace id {tracing.trace_id_of(traceparent)} (traceparent {traceparent})", file=sys.stderr
    )
    return {"traceparent": traceparent, "tracestate": args.tracestate}


def _load_mnist(count: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from core.idx import find_data_dir, load_idx_dir

    folder = find_data_dir("mnist", data_dir)
    if folder is None:
        raise ValueError(
            "--mnist-test needs the MNIST files: pass --data-dir or set MNIST_DATA_DIR"
        )
    data = load_idx_dir(folder)
    return data.test_images[:count], data.test_labels[:count]


def run(args: argparse.Namespace) -> int:
    if not args.images and not args.mnist_test:
        raise ValueError("give PNG/JPEG files, or --mnist-test N")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    tls, token = client_security(
        args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.auth_token_file
    )
    trace = _trace_headers(args)
    if args.api == "rest":
        target = args.target or "localhost:8000"
        client = RestClient(target, timeout=args.timeout, tls=tls, token=token, **trace)
        return _report(*_predict_rest(args, client))
    target = args.target or "localhost:8500"
    client = ClassifierClient(target, timeout=args.timeout, tls=tls, token=token, **trace)
    return _report(*_predict_grpc(args, client))


def _predict_grpc(
    args: argparse.Namespace, client: ClassifierClient
) -> tuple[argparse.Namespace, list[str], np.ndarray, np.ndarray | None]:
    """The predictions over gRPC: MNIST digits by Classify or KServe v2, files by Classify."""
    with client:
        if args.mnist_test:
            images, labels = _load_mnist(args.mnist_test, args.data_dir)
            names = [f"mnist-test[{i}]" for i in range(len(images))]
            batches = [
                images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)
            ]
            if args.api == "kserve":
                predicted = np.concatenate(
                    [
                        client.infer_kserve(
                            batch, args.model_name or "mnist", args.model_version
                        ).argmax(axis=1)
                        for batch in batches
                    ]
                )
                return args, names, predicted, labels
            results = [
                client.classify(batch, args.model_name, args.model_version) for batch in batches
            ]
        else:
            if args.api == "kserve":
                raise ValueError(
                    "--api kserve takes --mnist-test; files go through the classifier API"
                )
            labels = None
            names = [str(path) for path in args.images]
            blobs = [path.read_bytes() for path in args.images]
            results = [
                client.classify_encoded(
                    blobs[i : i + args.batch_size], args.model_name, args.model_version
                )
                for i in range(0, len(blobs), args.batch_size)
            ]
        _say_who_answered(args, results)
        return args, names, np.concatenate([result.labels for result in results]), labels


def _predict_rest(
    args: argparse.Namespace, client: RestClient
) -> tuple[argparse.Namespace, list[str], np.ndarray, np.ndarray | None]:
    """The same predictions over KServe v2 REST (MNIST digits) or the page's /api/classify (files)."""
    with client:
        if args.mnist_test:
            images, labels = _load_mnist(args.mnist_test, args.data_dir)
            predicted = np.concatenate(
                [
                    client.infer(
                        images[i : i + args.batch_size],
                        args.model_name or "mnist",
                        args.model_version,
                    ).argmax(axis=1)
                    for i in range(0, len(images), args.batch_size)
                ]
            )
            return args, [f"mnist-test[{i}]" for i in range(len(images))], predicted, labels
        predicted = np.array(
            [client.classify_encoded(path.read_bytes())["label"] for path in args.images]
        )
        return args, [str(path) for path in args.images], predicted, None


def _say_who_answered(args: argparse.Namespace, results: list) -> None:
    """Which model and version(s) computed the answers (a new version may take over mid-run)."""
    if not args.quiet:
        answered = sorted({(r.model_name, r.model_version) for r in results})
        print("answered by " + ", ".join(f"{name} version {version}" for name, version in answered))


def _report(
    args: argparse.Namespace, names: list[str], predicted: np.ndarray, labels: np.ndarray | None
) -> int:
    if not args.quiet:
        for index, (name, label) in enumerate(zip(names, predicted)):
            truth = (
                ""
                if labels is None
                else f"  (true {labels[index]}{'' if labels[index] == label else ', WRONG'})"
            )
            print(f"{name}: {label}{truth}")
    if labels is not None:
        correct = int((predicted == labels).sum())
        print(f"accuracy: {correct}/{len(labels)} = {correct / len(labels):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except grpc.RpcError as err:
        print(
            f"mnist-predict: error: {args.target or 'localhost:8500'} answered {err.code().name}: {err.details()}",
            file=sys.stderr,
        )
    except RestError as err:
        print(
            f"mnist-predict: error: {args.target or 'localhost:8000'} answered {err}",
            file=sys.stderr,
        )
    except (ValueError, OSError) as err:
        print(f"mnist-predict: error: {err}", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - e.g. a data-set error: one line, not a traceback
        print(f"mnist-predict: error: {type(err).__name__}: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
