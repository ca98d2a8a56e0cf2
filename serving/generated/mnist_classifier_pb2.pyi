from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("raw_pixels", "float_pixels", "encoded")
    RAW_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FLOAT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    raw_pixels: bytes
    float_pixels: FloatPixels
    encoded: bytes
    def __init__(self, raw_pixels: _Optional[bytes] = ..., float_pixels: _Optional[_Union[FloatPixels, _Mapping]] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class FloatPixels(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "class_name", "confidence", "probabilities")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: int
    class_name: str
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., class_name: _Optional[str] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model_name", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_name: str
    model_version: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("model_name", "model_version", "available_versions", "class_names", "input_name", "input_shape", "input_datatype", "max_batch_size", "test_accuracy", "recipe", "trained_at", "model_sha256", "execution_provider", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DATATYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    TRAINED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    available_versions: _containers.RepeatedScalarFieldContainer[str]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_datatype: str
    max_batch_size: int
    test_accuracy: float
    recipe: str
    trained_at: str
    model_sha256: str
    execution_provider: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., available_versions: _Optional[_Iterable[str]] = ..., class_names: _Optional[_Iterable[str]] = ..., input_name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_datatype: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., test_accuracy: _Optional[float] = ..., recipe: _Optional[str] = ..., trained_at: _Optional[str] = ..., model_sha256: _Optional[str] = ..., execution_provider: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
