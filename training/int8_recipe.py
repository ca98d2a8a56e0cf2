"""How the INT8 copy is made: one frozen recipe, the study's choice as its defaults.

training/quantize.py follows it; training/int8_study.py compares variants of it (docs/int8.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Int8Recipe:
    """How the INT8 copy is made. The defaults are the study's choice (docs/int8.md,
    `python -m training.int8_study`): on the article recipe's models the quantized last layer
    caused most of the disagreement (its 10 logits rounded to 8 bits flip close calls: 8-18
    test images per seed, 2-5 with it in FP32), and it holds 0.3 % of the multiply-adds (10k of
    3.7M), so keeping it FP32 costs next to nothing. No calibration method or size, weight or
    activation scheme moved the agreement by more than a few images."""

    calibration: str = "MinMax"  # MinMax, Entropy or Percentile (onnxruntime's calibrators)
    calibration_images: int = 1000  # training images; min/max ranges are stable from a few hundred
    per_channel: bool = True  # each filter its own scale: the filters' ranges differ a lot
    quant_format: str = "QDQ"  # or QOperator (QLinearConv...); onnxruntime's CPU kernels prefer QDQ
    activations: str = "uint8"  # U8 activations x S8 weights: the VNNI instruction's form; or int8
    symmetric_activations: bool = False
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI whose u8 x s8 sums saturate
    fp32_first_layer: bool = False  # the first convolution kept in FP32
    fp32_last_layer: bool = True  # the dense layer (logits) kept in FP32

    def __post_init__(self) -> None:
        if self.calibration not in ("MinMax", "Entropy", "Percentile"):
            raise ValueError(
                f"unknown calibration '{self.calibration}'; use MinMax, Entropy or Percentile"
            )
        if self.quant_format not in ("QDQ", "QOperator"):
            raise ValueError(f"unknown format '{self.quant_format}'; use QDQ or QOperator")
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"unknown activation type '{self.activations}'; use uint8 or int8")
        if self.calibration_images < 1:
            raise ValueError("INT8 quantization needs at least one calibration image")

    def describe(self) -> str:
        kept = [
            name
            for name, kept in (("first", self.fp32_first_layer), ("last", self.fp32_last_layer))
            if kept
        ]
        return ", ".join(
            [
                f"static {self.quant_format}",
                f"{self.calibration} calibration on {self.calibration_images:,} images",
                "per-channel weights" if self.per_channel else "per-tensor weights",
                ("symmetric " if self.symmetric_activations else "")
                + f"{self.activations} activations",
                *(["7-bit weights (reduce_range)"] if self.reduce_range else []),
                (
                    f"{' and '.join(kept)} layer{'s' if len(kept) > 1 else ''} FP32"
                    if kept
                    else "every layer INT8"
                ),
            ]
        )

    def as_metadata(self, calibration_images: int) -> dict[str, object]:
        return {
            "method": "static",
            "format": self.quant_format,
            "activations": self.activations,
            "weights": "int8",
            "per_channel": self.per_channel,
            "calibration": self.calibration,
            "calibration_images": calibration_images,
            "symmetric_activations": self.symmetric_activations,
            "reduce_range": self.reduce_range,
            "fp32_first_layer": self.fp32_first_layer,
            "fp32_last_layer": self.fp32_last_layer,
        }


DEFAULT_RECIPE = Int8Recipe()
