"""The public surface: `vsteer.__all__` is exactly what is exported, and imports stay light."""

from __future__ import annotations

import subprocess
import sys

import vsteer

EXPECTED = {
    "LLM", "EngineError", "ModelPreparationError", "SaeFileError", "SlotCapacityError", "SpecError", "SteeringSpec",
    "SteeringVector", "UnsupportedArchitectureError", "VectorFileError", "VectorStore", "VsteerError",
    "load_vector", "main", "mean_difference", "parse_spec", "save_vector",
}


def test_all_matches_exports():
    assert set(vsteer.__all__) == EXPECTED
    for name in vsteer.__all__:
        assert getattr(vsteer, name) is not None


def test_errors_share_one_base():
    for name in ("EngineError", "ModelPreparationError", "SaeFileError", "SlotCapacityError", "SpecError",
                 "UnsupportedArchitectureError", "VectorFileError"):
        assert issubclass(getattr(vsteer, name), vsteer.VsteerError)


def test_import_does_not_load_vllm():
    code = "import sys, vsteer, vsteer.kernels, vsteer.vectors, vsteer.methods; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
