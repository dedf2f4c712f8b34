"""Feature effects and SAE-targeted steering (SAE-TS; DESIGN.md section 6, METHODS.md "SAE-TS").

- `EffectData`, `load_effects`, `save_effects`: the ``effects.safetensors`` file (directions ``X``
  and their measured SAE feature effects ``Y``) shared by the measuring code and the fits.
- `EffectApproximator`: the linear map ``y_hat = x M + b`` (Adam as in the paper, or least squares),
  its metrics and its file; `train_test_split`.
- `targeted_vector` (eq. 3), `pseudoinverse_vector`, `rotation_vector` / `rotation_matrix`
  (appendix D): `SteeringVector`s that target SAE features.
- `top_effects_table`, `plot_effect_heatmap`, `plot_approximator_fit`: reading effects.

Imports plain torch only (no vLLM, no Ray; matplotlib only when a plot is drawn).
"""

from vsteer.effects.approximator import EffectApproximator, train_test_split
from vsteer.effects.data import EffectData, EffectsFileError, load_effects, save_effects
from vsteer.effects.report import (
    plot_approximator_fit,
    plot_effect_heatmap,
    top_effects_table,
)
from vsteer.effects.targeted import (
    pseudoinverse_vector,
    rotation_matrix,
    rotation_vector,
    targeted_vector,
)

__all__ = [
    "EffectApproximator",
    "EffectData",
    "EffectsFileError",
    "load_effects",
    "plot_approximator_fit",
    "plot_effect_heatmap",
    "pseudoinverse_vector",
    "rotation_matrix",
    "rotation_vector",
    "save_effects",
    "targeted_vector",
    "top_effects_table",
    "train_test_split",
]
