"""SAEs built during the test run from real activations of the default model (no download).

Features are random unit directions (half) and centred activation samples (half), with biases
or thresholds set so each fires on about 10% of the calibration tokens: enough structure for
SAS to change text, and deterministic.
"""

from __future__ import annotations

import torch

from vsteer.sae import SaeConfig, SparseAutoencoder

CALIBRATION = [
    "The wedding was held in a small church by the sea.",
    "I think the weather in London is getting worse every year.",
    "def add(a, b):\n    return a + b",
    "She was so angry that she slammed the door and left.",
    "Bonjour, je m'appelle Marie et j'habite à Paris.",
    "The stock market fell sharply after the announcement.",
    "My favourite food is pizza with extra cheese.",
    "Photosynthesis turns light into chemical energy in plants.",
]

#: activation -> (layer, d_sae, k)
SPECS = {"relu": (10, 512, None), "jumprelu": (15, 512, None), "topk": (20, 512, 16)}


@torch.no_grad()
def calibration_activations(hf_model, tokenizer, layer: int) -> torch.Tensor:
    rows = []
    for text in CALIBRATION:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        hs = hf_model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(hs[1:])  # the first token is an attention-sink outlier
    return torch.cat(rows).float()


@torch.no_grad()
def build_sae(acts: torch.Tensor, activation: str, layer: int, d_sae: int, k: int | None, *, model: str, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    d = acts.shape[1]
    mean = acts.mean(0)
    centred = acts - mean
    picks = centred[torch.randint(len(centred), (d_sae // 2,), generator=g)]
    dirs = torch.cat([torch.randn(d_sae - d_sae // 2, d, generator=g), picks])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    cfg = SaeConfig(d_in=d, d_sae=d_sae, activation=activation, k=k, layer=layer, model=model,
                    apply_b_dec_to_input=True, name=f"test-{activation}")
    sae = SparseAutoencoder(cfg)
    sae.W_enc.copy_(dirs.t())
    sae.W_dec.copy_(dirs * 4.0)
    sae.b_dec.copy_(mean)
    q = torch.quantile(centred @ dirs.t(), 0.9, dim=0)
    if activation == "relu":
        sae.b_enc.copy_(-q)
    elif activation == "jumprelu":
        sae.threshold.copy_(q.clamp(min=0.0))
    return sae


def build_test_saes(hf_model, tokenizer, model_name: str) -> dict[str, SparseAutoencoder]:
    """name -> SAE for every activation kind, each at its own layer."""
    out = {}
    for activation, (layer, d_sae, k) in SPECS.items():
        acts = calibration_activations(hf_model, tokenizer, layer)
        out[f"test-{activation}"] = build_sae(acts, activation, layer, d_sae, k, model=model_name)
    return out
