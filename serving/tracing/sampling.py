"""The sampler's decision, taken here where it is certain and cheap, before any span exists.

A call the sampler does not keep creates no span at all: for the samplers the SDK knows by name,
this module takes the same decision from the trace id itself (and hands a sampled root's id to
the SDK through its id generator), since asking the SDK costs a span's creation even for a call
it drops (about 0.1 ms a call on the 2 shared cores this was measured on), which at 1 % would be
paid by the other 99 %. Measured with bench/tracing_cost.py: see docs/tracing.md.
"""

from __future__ import annotations

import os
import random
from typing import Any

from serving.tracing.settings import TraceSettings

_parent_based = False  # parentbased_*: a caller's decision is followed
_root_always = True  # calls that start a trace: always_on (the SDK decides: it records them all)
_bound: int | None = None  # traceidratio: sampled when the trace id's low 64 bits are below it
_preset_trace_id: int | None = None  # the id a sampled root was decided with, for the SDK to use

_LOW_64 = (1 << 64) - 1
_random = random.Random()


def follow(settings: TraceSettings) -> None:
    """Decide as the configured sampler does, built by the SDK from the flag or OTEL_* values."""
    global _parent_based, _root_always, _bound
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    if settings.sample_ratio is not None:
        name, ratio = "parentbased_traceidratio", str(settings.sample_ratio)
    else:
        name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    _parent_based = name.startswith("parentbased_")
    root = name.removeprefix("parentbased_")
    _root_always, _bound = root == "always_on", None
    if root == "always_off":
        _bound = 0
    elif root == "traceidratio":
        try:
            rate = float(ratio)
        except ValueError:  # the SDK uses 1.0 then (and says so)
            rate = 1.0
        _bound = TraceIdRatioBased.get_bound_for_rate(rate)
    elif root != "always_on":  # a sampler this module does not know: the SDK decides every call
        _parent_based, _root_always = False, True


def dropped(parent: Any) -> bool:
    """Whether a call with this extracted context goes unsampled; for a sampled call that starts a
    trace, the trace id it was decided with is left for the SDK's id generator (_PresetIds)."""
    global _preset_trace_id
    if _root_always and not _parent_based:
        return False
    from opentelemetry import trace

    caller = trace.get_current_span(parent).get_span_context()
    if caller.is_valid:
        if _parent_based:
            return not caller.trace_flags.sampled
        return _bound is not None and (caller.trace_id & _LOW_64) >= _bound
    if _root_always:
        return False
    trace_id = _random.getrandbits(128) or 1
    if (trace_id & _LOW_64) >= _bound:
        return True
    _preset_trace_id = trace_id  # no await before the SDK's start_span takes it
    return False


def id_generator() -> Any:
    """The SDK's id generator, taking the trace id `dropped` drew for a sampled root."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _PresetIds(RandomIdGenerator):
        """The SDK's random ids, except a trace id already drawn (and sampled) by dropped."""

        def generate_trace_id(self) -> int:
            global _preset_trace_id
            preset, _preset_trace_id = _preset_trace_id, None
            return preset if preset is not None else super().generate_trace_id()

    return _PresetIds()
