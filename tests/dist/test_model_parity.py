"""Megatron-core Qwen2 / Qwen2.5-VL against HF transformers at TP=1, TP=2 and PP=2 (one torchrun launch)."""
import json

import pytest

from tests.conftest import torchrun

TOL = 1e-4


@pytest.fixture(scope="module")
def parity(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    (d / "models.json").write_text(json.dumps(tiny_models))
    torchrun("tests/dist/parity_worker.py", str(d / "models.json"), str(d / "out.json"))
    res = json.loads((d / "out.json").read_text())
    print(json.dumps(res, indent=1))
    return res


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("case", ["q2_tied", "q2_untied_gqa4", "vl_untied", "vl_tied"])
def test_logits_match_hf(parity, layout, case):
    keys = [k for k in parity if k.startswith(f"{layout}/{case}/")]
    expected = 1 if case.startswith("q2") else 3  # VL: text + two image sizes
    assert len(keys) == expected, keys
    for k in keys:
        assert parity[k]["max_abs_diff"] <= TOL, (k, parity[k])
        assert parity[k]["argmax_equal"], (k, parity[k])


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("case", ["q2_tied", "q2_untied_gqa4", "vl_untied", "vl_tied"])
def test_policy_logprobs_match_hf(parity, layout, case):
    """Vocabulary 503 is padded to 512: the trainer must normalise over the true 503 tokens, as HF and vLLM do."""
    diffs = parity[f"logprob/{layout}/{case}"]
    assert len(diffs) == (1 if case.startswith("q2") else 3) and max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("case", ["q2_tied", "q2_untied_gqa4", "vl_untied", "vl_tied"])
def test_gradients_match_hf_at_tp2(parity, case):
    (key,) = [k for k in parity if k.startswith(f"grad/{case}/")]
    r = parity[key]
    assert not r["missing"], r
    assert r["max_rel_diff"] < 1e-4 and r["max_abs_diff"] < 1e-4, r
