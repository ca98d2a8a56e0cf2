"""Protobuf messages as Triton's REST API writes them: the JSON of its extensions' answers.

Triton's repository, configuration and statistics endpoints answer over REST with the same
messages its gRPC API sends (serving.grpc_api.triton builds them once, for both), written as JSON
in Triton's spelling: proto field names, every field (zeros too), enums by name, and 64-bit
integers as numbers where protobuf's own JSON writes strings.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

# The 64-bit integer field types, which protobuf's JSON writes as strings (JavaScript's numbers lose
# precision above 2^53) and Triton's REST API writes as numbers; tritonclient.http expects numbers.
_INT64_TYPES = frozenset(
    {
        descriptor.FieldDescriptor.TYPE_INT64,
        descriptor.FieldDescriptor.TYPE_UINT64,
        descriptor.FieldDescriptor.TYPE_SINT64,
        descriptor.FieldDescriptor.TYPE_FIXED64,
        descriptor.FieldDescriptor.TYPE_SFIXED64,
    }
)


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST API writes it: proto field names, every field (zeros too),
    enums by name, 64-bit integers as numbers."""
    value = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(message.DESCRIPTOR, value)
    return value


def _int64_as_numbers(message_type: descriptor.Descriptor, value: dict[str, Any]) -> None:
    for field in message_type.fields:
        if field.name not in value:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry_value = field.message_type.fields_by_name["value"]
            entries = value[field.name]
            for key in entries:
                entries[key] = _field_as_number(entry_value, entries[key])
        elif field.is_repeated:
            value[field.name] = [_field_as_number(field, item) for item in value[field.name]]
        else:
            value[field.name] = _field_as_number(field, value[field.name])


def _field_as_number(field: descriptor.FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        _int64_as_numbers(field.message_type, value)
        return value
    return int(value) if field.type in _INT64_TYPES else value
