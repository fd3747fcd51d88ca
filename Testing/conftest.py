"""Shared pytest set-up: one CPU thread per test process (CI machines are small and shared)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
