"""Device placement shared by every model-holding stage and trainer: GPU when present, else CPU."""

from __future__ import annotations

import contextlib

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' picks cuda when available, else cpu; 'cpu'/'cuda'/'cuda:N' are taken as given."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def autocast(device: torch.device, dtype: torch.dtype | None = torch.bfloat16):
    """bf16 (or the given dtype) autocast on GPU; a no-op on CPU, where fp32 is faster and exact."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype to load frozen/inference models in: bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
