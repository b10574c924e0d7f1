"""A rollout backend is anything that satisfies `rollout/protocols.Engine`: a stand-in engine with no vLLM behind it
runs a whole infer period of the real trainer (Megatron update, recycling, the weight sync into it)."""
import json
from pathlib import Path

from tests.conftest import torchrun

ROOT = Path(__file__).resolve().parents[2]


def test_a_stand_in_engine_runs_a_period(tmp_path):
    from megatron_spark.fixtures.shapes import make_colour_text_task
    from megatron_spark.fixtures.tiny import build_qwen2

    hf = build_qwen2(tmp_path / "model", tied=False, seed=1)
    train = make_colour_text_task(tmp_path / "train", 16, seed=0)
    out = tmp_path / "out.json"
    torchrun("tests/dist/standin_worker.py", str(hf), str(train), str(ROOT / "examples" / "templates" / "tiny.yaml"),
             str(tmp_path / "run"), str(out), nproc=1, timeout=600)
    res = json.loads(out.read_text())
    assert res["engine_is_an_engine"] and res["rollouts_are_rollouts"]
    m = res["metrics"]
    assert res["requests"] == 4 and m["infer/samples_generated"] == 16  # 4 prompts x 4 samples, all from it
    assert res["responses"] == ["\\boxed{1}", "\\boxed{2}"]  # what was recycled is what it answered
    assert 0 < m["infer/reward_mean"] < 1 and m["infer/prompt_token_mismatch"] == 0
    assert m["infer/optimizer_steps"] == 2 and m["infer/grad_norm"] > 0  # the trainer updated on its samples
    assert res["synced_once"] and res["synced_like_hf"]  # then gave it the new weights, every HF tensor
    # the reward period: 4 judge groups, each with one verdict from the stand-in; algorithm.recycle.
    # counterfactual_verdicts swapped one sample of each, so every group contrasts the two verdicts and trains
    j = res["judged"]
    assert j["reward/samples_generated"] == 16 and j["reward/diag/judge_share"] == 1.0
    assert j["reward/counterfactual_groups"] == 4 and j["reward/diag/judge_groups_with_gradient"] == 1.0
    assert 0 < j["reward/reward_mean"] < 1 and j["reward/grad_norm"] > 0
    assert j["reward/diag/verdict_yes"] + j["reward/diag/verdict_a"] == 0.25  # the one swapped sample per group
    # ... while what the stand-in itself gave is logged apart: no group with a gradient, never Yes or A
    assert j["reward/judge_groups_with_gradient_sampled"] == 0.0 and j["reward/verdict_first_option_sampled"] == 0.0
