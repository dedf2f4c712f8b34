"""SAS vector generation (Algorithm 1) on hand-made codes and on the real engine, CLI included."""

from __future__ import annotations

import json

import pytest
import torch
from vllm import SamplingParams

from vsteer.methods.sas import ContrastPair, sas_from_codes, sas_vector

PAIRS = [
    ContrastPair("I think", " the wedding was beautiful, the bride wore white.", " the tax form was due on Monday."),
    ContrastPair("Yesterday", " we danced at the wedding reception until midnight.", " we filed the quarterly audit report."),
    ContrastPair("My sister", " is getting married in June, the ceremony is by the sea.", " is doing her accounts and paperwork."),
    ContrastPair("The best day", " was our wedding, with rings, vows and a cake.", " was when the invoice finally got paid."),
]


def test_algorithm_on_hand_made_codes():
    pos = torch.tensor([[1.0, 2.0, 0.0, 3.0, 0.0],
                        [3.0, 0.0, 0.0, 5.0, 1.0],
                        [2.0, 4.0, 0.0, 4.0, 0.0]])
    neg = torch.tensor([[0.0, 0.0, 7.0, 1.0, 0.0],
                        [0.0, 0.0, 9.0, 1.0, 0.0],
                        [0.0, 1.0, 8.0, 1.0, 0.0]])
    s = sas_from_codes(pos, neg, tau=0.6)
    # f0: pos only (freq 1, mean 2); f1: pos freq 2/3 -> mean over active rows 3, neg freq 1/3 < tau;
    # f2: neg only (mean 8); f3: active on both sides -> dropped; f4: pos freq 1/3 < tau.
    assert s.tolist() == [2.0, 3.0, -8.0, 0.0, 0.0]
    assert sas_from_codes(pos, neg, tau=1.0).tolist() == [2.0, 0.0, -8.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="tau"):
        sas_from_codes(pos, neg, tau=1.5)
    with pytest.raises(ValueError, match="d_sae"):
        sas_from_codes(pos, neg[:, :4], tau=0.5)


def test_sas_vector_from_the_engine_steers(eager_llm):
    sae = eager_llm.saes["test-relu"]
    v = sas_vector(eager_llm, sae, PAIRS, tau=0.5, sae_name="test-relu", model=eager_llm.model_shape.name)
    s = v.layers[sae.layer]
    assert v.method == "sas" and v.hidden_size == sae.d_sae and sorted(v.layers) == [sae.layer]
    assert v.provenance["tau"] == 0.5 and v.provenance["sae"] == "test-relu"
    assert v.provenance["sae_sha256"] == sae.sha256() and v.provenance["support"] == int((s != 0).sum()) > 0
    # the same codes computed by hand from captured activations
    tok = eager_llm.get_tokenizer()
    pos_rows, neg_rows = [], []
    for pair in PAIRS:
        head = tok(pair.prompt)["input_ids"]
        for text, rows in ((pair.positive, pos_rows), (pair.negative, neg_rows)):
            ids = head + tok(text, add_special_tokens=False)["input_ids"]
            acts = eager_llm.capture([ids], [sae.layer])[0][sae.layer][len(head):]
            rows.append(sae.encode(acts).mean(0))
    with torch.no_grad():
        want = sas_from_codes(torch.stack(pos_rows), torch.stack(neg_rows), 0.5)
    torch.testing.assert_close(s, want, atol=1e-5, rtol=1e-4)
    sha = eager_llm.store.put(v)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    outs = eager_llm.generate(["I think"] * 2, params, steering=[
        {"interventions": [{"op": "sas", "vector": sha, "sae": "test-relu", "scale": 4.0}]}, None])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_extract_sas_cli(tmp_path, sae_store_dir, eager_llm, monkeypatch):
    from tests.test_cli import run
    from vsteer import load_vector

    monkeypatch.setenv("VSTEER_SAE_STORE", str(sae_store_dir))
    monkeypatch.setenv("VSTEER_VECTOR_STORE", str(eager_llm.store.root))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "positive": p.positive, "negative": p.negative}) + "\n" for p in PAIRS))
    out = tmp_path / "wedding-sas.safetensors"
    proc = run("extract", "sas", "--sae", "test-jumprelu", "--pairs", str(pairs), "--tau", "0.5", "--output", str(out),
               "--name", "wedding-sas", "--dtype", "float32")
    assert "support" in proc.stderr
    v = load_vector(out)
    assert v.method == "sas" and v.provenance["sae"] == "test-jumprelu" and v.hidden_size == 512
    plan = eager_llm.resolve({"interventions": [{"op": "sas", "vector": "wedding-sas", "sae": "test-jumprelu", "scale": 2.0}]})
    assert plan.interventions[0].support == v.provenance["support"]
    bad = run("extract", "sas", "--sae", "no-such-sae", "--pairs", str(pairs), "--output", str(out), check=False)
    assert bad.returncode != 0 and "unknown SAE" in bad.stderr
