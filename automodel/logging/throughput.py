"""Throughput people can trust: real tokens/s, label tokens/s, peak memory and MFU.

FLOPs per trained token (documented in README "Monitoring"): 2 x params for the forward pass, 2 x params to
propagate activation gradients backwards, and 2 x trainable params for weight gradients:

    flops_per_token = 4 * total_params + 2 * trainable_params

which is the usual 6 * params for full SFT and less for LoRA, whose frozen weights get no weight gradient.
Attention scores (about 12 * layers * hidden * seq_length per token) are left out, so MFU reads slightly low
for long sequences. MFU = flops_per_token * tokens/s / peak FLOP/s of one device, per process.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common accelerators, matched against the CUDA device name.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "V100": 125.0,
}


@dataclass
class MfuConfig:
    """`logging.mfu`: the device's peak TFLOP/s (default: looked up from the CUDA device name)."""

    peak_tflops: float | None = None

    def __post_init__(self):
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops: expected a positive number of TFLOP/s, got {self.peak_tflops}")


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The configured peak, else the known peak of this CUDA device, else None (no MFU is reported)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), None)


def flops_per_token(total_params: int, trainable_params: int) -> int:
    return 4 * total_params + 2 * trainable_params


def peak_memory_gb(device: torch.device) -> float:
    """CUDA's peak allocated memory on a GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux


class ThroughputMeter:
    """Sums tokens and step time per logging window (what a logged record reports) and for the whole run."""

    def __init__(self, device: torch.device, flops_per_token: int, peak_tflops: float | None):
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.window = [0, 0, 0.0]  # tokens, label tokens, seconds
        self.total = [0, 0, 0.0]

    def add(self, record: dict) -> None:
        """Count one optimizer step from its train_step record (tokens, label_tokens, step_s)."""
        for sums in (self.window, self.total):
            sums[0] += record["tokens"]
            sums[1] += record["label_tokens"]
            sums[2] += record["step_s"]

    def _rates(self, sums: list) -> dict[str, float]:
        tokens, label_tokens, seconds = sums
        seconds = max(seconds, 1e-9)
        rates = {"tokens_per_s": tokens / seconds, "label_tokens_per_s": label_tokens / seconds,
                 "peak_memory_gb": peak_memory_gb(self.device)}
        if self.peak_tflops:
            rates["mfu"] = self.flops_per_token * tokens / seconds / (self.peak_tflops * 1e12)
        return rates

    def window_rates(self) -> dict[str, float]:
        """Rates since the last call (the steps one logged record covers); starts the next window."""
        rates = self._rates(self.window)
        self.window = [0, 0, 0.0]
        return rates

    def run_rates(self) -> dict[str, float]:
        return {**self._rates(self.total), "tokens": self.total[0], "label_tokens": self.total[1],
                "train_s": self.total[2]}
