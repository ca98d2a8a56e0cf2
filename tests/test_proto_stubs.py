"""The committed gRPC stubs match the .proto files, and the KServe API matches the standard.

Stub imports run in subprocesses: tritonclient registers the same `inference.*`
protobuf symbols as our KServe stubs, and the pytest process may have it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KSERVE_METHODS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    # Triton's extensions (issue 11)
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
]

# Prints {message: {field: [number, type, label]}} for every message a module's file defines.
_FIELDS_PROBE = """
import importlib, json, sys
def fields(message, out):
    out[message.full_name] = {f.name: [f.number, f.type, f.is_repeated] for f in message.fields}
    for nested in message.nested_types:
        fields(nested, out)
out = {}
for message in importlib.import_module(sys.argv[1]).DESCRIPTOR.message_types_by_name.values():
    fields(message, out)
print(json.dumps(out))
"""


def run_python(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_committed_stubs_are_up_to_date() -> None:
    output = run_python(str(REPO_ROOT / "proto" / "generate.py"), "--check")
    assert "up to date" in output


def test_stubs_import_as_a_package_and_name_the_kserve_methods() -> None:
    probe = """
import json
from serving.generated import mnist_classifier_pb2, mnist_classifier_pb2_grpc
from serving.generated import grpc_predict_v2_pb2_grpc

class Recorder:
    def __init__(self):
        self.paths = []
    def unary_unary(self, path, *args, **kwargs):
        self.paths.append(path)

kserve, classifier = Recorder(), Recorder()
grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(kserve)
mnist_classifier_pb2_grpc.ClassifierStub(classifier)
print(json.dumps({"kserve": kserve.paths, "classifier": classifier.paths,
                  "package": mnist_classifier_pb2.DESCRIPTOR.package}))
"""
    found = json.loads(run_python("-c", probe))
    assert sorted(found["kserve"]) == sorted(
        f"/inference.GRPCInferenceService/{m}" for m in KSERVE_METHODS
    )
    assert sorted(found["classifier"]) == [
        "/mnist.v1.Classifier/Classify",
        "/mnist.v1.Classifier/DescribeModel",
    ]
    assert found["package"] == "mnist.v1"


def test_kserve_messages_match_tritonclient_on_the_wire() -> None:
    # tritonclient is a dev dependency: the reference implementation must be there (imported in children).
    ours = json.loads(run_python("-c", _FIELDS_PROBE, "serving.generated.grpc_predict_v2_pb2"))
    triton = json.loads(run_python("-c", _FIELDS_PROBE, "tritonclient.grpc.service_pb2"))
    for message, fields in ours.items():
        assert message in triton, f"{message} is not in tritonclient's protocol"
        for name, spec in fields.items():
            assert triton[message].get(name) == spec, (
                f"{message}.{name}: ours {spec}, triton {triton[message].get(name)}"
            )


def test_importing_the_client_leaves_kserve_symbols_unregistered() -> None:
    probe = """
import serving.client
from google.protobuf import descriptor_pool
try:
    descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
except KeyError:
    print("unregistered")
"""
    assert run_python("-c", probe).strip() == "unregistered"
