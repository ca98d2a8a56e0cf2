"""A model's config.pbtxt, read as Triton's ModelConfig message, and the version policy it names.

The file is what `core.repository.write_version` writes and Triton reads; a model without one
(a bare Triton-style folder) gets the same config that write_version would have written.
Imports the generated protobuf stubs: load it in the server process only (tritonclient
registers the same `inference.*` message names).
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from core.repository import CONFIG_FILENAME, triton_config
from serving.generated import model_config_pb2
from serving.inference.version_policy import VersionPolicy

ModelConfig = model_config_pb2.ModelConfig
PLATFORM = "onnxruntime_onnx"


class ConfigError(ValueError):
    """A config.pbtxt that cannot be read; the message names the file."""


def read_model_config(model_dir: Path, max_batch_size: int) -> model_config_pb2.ModelConfig:
    """The model's ModelConfig with Triton's defaults filled in (name, platform, version policy).

    `max_batch_size` is the server's own (--max-batch-size): the limit callers really meet,
    which perf_analyzer and model_analyzer read from here.
    """
    name = model_dir.name
    path = model_dir / CONFIG_FILENAME
    config = model_config_pb2.ModelConfig()
    try:
        text = (
            path.read_text(encoding="utf-8")
            if path.is_file()
            else triton_config(name, max_batch_size)
        )
        text_format.Parse(text, config, allow_unknown_field=True)
    except (text_format.ParseError, UnicodeDecodeError) as err:  # binary garbage is not UTF-8 text
        raise ConfigError(
            f"{path} is not a valid Triton model configuration ({_first_line(err)}); "
            "fix or rewrite it"
        ) from err
    if config.name and config.name != name:
        raise ConfigError(
            f"{path} names model '{config.name}' but sits in folder '{name}'; Triton requires them equal"
        )
    config.name = name
    if not config.platform and not config.backend:
        config.platform = PLATFORM
    config.max_batch_size = max_batch_size
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    version_policy(config)  # refuse a policy that cannot work now, not at the first poll
    return config


def version_policy(config: model_config_pb2.ModelConfig) -> VersionPolicy:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    try:
        if choice == "all":
            return VersionPolicy("all")
        if choice == "specific":
            return VersionPolicy("specific", versions=tuple(policy.specific.versions))
        if choice == "latest":
            return VersionPolicy("latest", num_versions=policy.latest.num_versions)
    except ValueError as err:
        raise ConfigError(f"{CONFIG_FILENAME} of model '{config.name}': {err}") from err
    return VersionPolicy()


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
