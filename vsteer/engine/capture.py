"""Activation capture inside the engine: each capture request gets exactly ``prompt_len`` rows.

Rows are written by position, so a prefill split over several steps fills them in pieces, and a
prefix recomputed after preemption overwrites the same rows instead of adding rows. The runner's
capture buffer is overwritten by the next step, so rows are copied out right after the forward
pass. The file is written (atomically) once every row is filled.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vsteer.engine.token_map import StepRun


@dataclass
class _Capture:
    layers: list[int]
    path: str
    prompt_len: int
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [prompt_len, hidden]
    filled: np.ndarray = field(default=None)  # bool [prompt_len]


class CaptureBook:
    """The capture requests the runner serves, and the rows each still needs."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self._live: dict[str, _Capture] = {}
        self._step: list[tuple[str, int, int, int]] = []  # (req_id, batch offset, first position, count)

    def register(self, req_id: str, spec: dict, prompt_len: int) -> None:
        layers = [int(x) for x in spec["layers"]]
        self._live[req_id] = _Capture(
            layers, spec["path"], prompt_len,
            {layer: torch.zeros(prompt_len, self.hidden_size) for layer in layers},
            np.zeros(prompt_len, dtype=bool),
        )

    def forget(self, req_id: str) -> None:
        self._live.pop(req_id, None)

    def plan_step(self, runs: list[StepRun]) -> bool:
        """Note the prompt rows this step computes for capture requests; whether there are any."""
        self._step = []
        if not self._live:
            return False
        for run in runs:
            cap = self._live.get(run.req_id)
            if cap is not None and run.start < cap.prompt_len:
                self._step.append((run.req_id, run.off, run.start, min(run.n, cap.prompt_len - run.start)))
        return bool(self._step)

    def read(self, buffers: dict[int, torch.Tensor]) -> None:
        """Copy this step's rows out of the capture ``buffers`` (layer -> [max_tokens, hidden]);
        write the finished captures."""
        for req_id, off, start, count in self._step:
            cap = self._live.get(req_id)
            if cap is None:
                continue
            for layer in cap.layers:
                cap.rows[layer][start : start + count].copy_(buffers[layer][off : off + count])
            cap.filled[start : start + count] = True
            if cap.filled.all():
                _save_atomic({f"layer.{layer}": rows for layer, rows in cap.rows.items()}, cap.path)
                del self._live[req_id]
        self._step = []


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, target)
