"""Domain errors to HTTP status codes, read from the one table (serving.inference.errors).

The handlers raise the model core's errors (serving.inference.errors) and never choose a
code; the middleware in serving.http_api.app answers them as the protocol's
`{"error": "<message>"}` with the code from STATUS_CODES. gRPC reads the same table
(serving.grpc_api.status), so the two cannot disagree.
"""

from __future__ import annotations

from serving.inference.errors import STATUS_CODES, ServingError, codes_for

HTTP_STATUS: dict[type[ServingError], int] = {
    cls: codes.http for cls, codes in STATUS_CODES.items()
}


def status_for(error: ServingError) -> int:
    """The code for `error`: its own class's, else the nearest base class's, else 500."""
    return codes_for(error).http
