"""Kernel tests: without a CUDA device, Triton runs in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here at collection
time (the test command may also set it). GPU tests are marked ``gpu`` and skip without a GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
