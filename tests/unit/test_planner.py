"""The planner's arithmetic against hand-computed cases and the published model sizes, its calibration error on the
GPU measurements, the layout rules it shares with the trainer, and the CLI (fast, first line = parameter counts).
The static terms are compared with the live trainer's tensors in tests/dist (parity_worker: static memory)."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spark.planner import calibration
from megatron_spark.planner.hardware import GPUS
from megatron_spark.planner.memory import GIB, Layout, Workload, layer_activation_bytes, plan_memory, state_bytes
from megatron_spark.planner.model import kv_bytes_per_token, load_model, param_counts, stage_params
from megatron_spark.planner.search import layout_problem, search

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,total,language,vision", [
    ("qwen2.5-vl-7b", 8.29, 7.62, 0.68), ("qwen2.5-vl-32b", 33.45, 32.76, 0.69), ("qwen2.5-vl-72b", 73.41, 72.71, 0.70),
    ("qwen2.5-7b", 7.62, 7.62, 0.0)])
def test_parameter_counts_match_the_published_sizes(name, total, language, vision):
    c = param_counts(load_model(name))
    assert (round(c.total / 1e9, 2), round(c.language / 1e9, 2), round(c.vision / 1e9, 2)) == (total, language, vision)


@pytest.mark.parametrize("name,total", [("qwen3-0.6b", 596_049_920), ("qwen3-4b", 4_022_468_096),
                                        ("qwen3-8b", 8_190_735_360), ("qwen3-32b", 32_762_123_264)])
def test_qwen3_parameter_counts_are_exact(name, total):
    """Element for element the released checkpoints' sizes (their safetensors index): q/k norms of head_dim 128 per
    layer, no qkv bias, tied embeddings up to 4B. A qkv bias counted in, or the norms left out, is off by ~1e5-1e6."""
    assert param_counts(load_model(name)).total == total


def test_stage_params_by_hand():
    s = load_model("qwen2.5-7b")
    h, f, q, kv, v = 3584, 18944, 3584, 512, 152064
    layer = 2 * h + (q + 2 * kv) * h + (q + 2 * kv) + h * q + 3 * h * f
    (one,) = stage_params(s, 1, 1)
    assert one.total == 28 * layer + 2 * v * h + h == param_counts(s).total
    # TP=2: the norms stay whole on each rank, everything else halves; the vocabulary pads to lcm(128, 2) = 128
    (two,) = stage_params(s, 2, 1)
    assert two.total == 28 * (2 * h + (layer - 2 * h) // 2) + v * h + h
    # PP=2 with 28 layers: 14 + 14; the embedding on stage 0, the final norm and output layer on stage 1
    a, b = stage_params(s, 1, 2)
    assert (a.layers, b.layers) == (14, 14) and a.total == 14 * layer + v * h and b.total == 14 * layer + v * h + h
    # the VL model's vision tower lives on stage 0 only
    vl = stage_params(load_model("qwen2.5-vl-7b"), 1, 2)
    assert vl[0].vision == param_counts(load_model("qwen2.5-vl-7b")).vision and vl[1].vision == 0


def test_bytes_per_parameter():
    n = 1000
    assert sum(state_bytes(n, "bf16", 4, False)) == 18 * n              # 2 + 4 + (4 + 8)
    assert sum(state_bytes(n, "bf16", 4, True)) == 6 * n + 12 * n // 4   # 6 + 12 / DP
    assert sum(state_bytes(n, "fp32", 1, False)) == 16 * n              # fp32 params: no master copy
    assert sum(state_bytes(n, "fp32", 2, True)) == 8 * n + 8 * n // 2


def test_kv_bytes_per_token():
    assert [kv_bytes_per_token(load_model(m)) // 1024 for m in ("qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b")] \
        == [56, 256, 320]
    s = load_model("qwen2.5-vl-7b")
    assert kv_bytes_per_token(s, 4) == 56 * 1024 // 4
    assert kv_bytes_per_token(s, 8) == 56 * 1024 // 4  # 4 KV heads at TP 8: each rank keeps one (replicated)


def test_layer_activations_by_hand():
    h, f, a, kv, d, s = 3584, 18944, 28, 4, 128, 2048
    unfused = 8 * s * h + 2 * s * (a * d + 2 * kv * d) + 2 * s * h + 6 * s * f + 4 * a * s * s
    assert layer_activation_bytes(h, f, a, kv, d, s, 1, "unfused", "none", False) == unfused
    flash = unfused - 4 * a * s * s + 4 * s * a
    assert layer_activation_bytes(h, f, a, kv, d, s, 1, "flash", "none", False) == flash
    tp2 = 8 * s * h + (unfused - 8 * s * h) / 2
    assert layer_activation_bytes(h, f, a, kv, d, s, 2, "unfused", "none", False) == tp2
    assert layer_activation_bytes(h, f, a, kv, d, s, 2, "unfused", "none", True) == unfused / 2


def test_calibration_error_within_ten_percent():
    errs = calibration.errors()
    assert len(errs) == 4 and all(abs(e) < 0.10 for _, _, e in errs), [(m.model, m.seq, p, e) for m, p, e in errs]


def test_in_flight_micro_batches_follow_1f1b():
    s = load_model("qwen2.5-7b")
    work = Workload(prompts=8, reward_prompts=0, n_samples=4, prompt_len=512, response_len=512)
    mem = plan_memory(s, Layout(tp=1, pp=4, dp=1), work)
    per_layer = [m.activations / m.parts["layers"] for m in mem]
    assert [round(x / per_layer[-1]) for x in per_layer] == [4, 3, 2, 1]


def test_layout_rules_and_reasons():
    s = load_model("qwen2.5-vl-32b")
    w = Workload()
    assert layout_problem(s, Layout(tp=3), w).startswith("TP 3: the model has 8 KV heads")
    assert layout_problem(s, Layout(rollout_tp=3), w).startswith("rollout TP 3: vLLM needs a TP that divides")
    plans = search(s, 8, 8, GPUS["h100-80gb"], w)
    bad = [p for p in plans if not p.feasible]
    assert bad and all("GiB" in p.reason for p in bad)
    tp1 = next(p for p in bad if p.layout.tp == 1 and p.layout.pp == 1)
    assert tp1.reason.startswith("stage 0 needs") or tp1.reason.startswith("rollout")
    ranked = [p.tokens_per_gpu_s() for p in plans if p.feasible]
    assert ranked == sorted(ranked, reverse=True)


@pytest.mark.slow
def test_plan_cli_leads_with_the_parameter_counts():
    """(How fast it is, is bench/'s business: timed tests are noise on a shared core.)"""
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "plan", "--model", "qwen2.5-vl-32b", "--gpus", "16",
                        "--gpu", "h100-80gb"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == ("qwen2.5-vl-32b: 33,452,718,336 (33.45 B) parameters (language model 32,763,876,352 "
                        "(32.76 B), vision tower 688,841,984 (688.84 M))")
    assert "| 1 | TP" in p.stdout and "feasible of" in p.stdout


GPU_EXAMPLES = {"spark_7b": ("qwen2.5-7b", 8), "spark_qwen3_8b": ("qwen3-8b", 8), "spark_vl_7b": ("qwen2.5-vl-7b", 8),
                "spark_vl_32b": ("qwen2.5-vl-32b", 16), "spark_vl_32b_offpolicy": ("qwen2.5-vl-32b", 24)}
CPU_EXAMPLES = {"tiny_cpu", "pretrained_study"}


def test_every_shipped_example_is_planned_or_known_to_be_cpu():
    """A new example config must join one of the two lists: a GPU example is planned below, a CPU one is run by
    the e2e tests and the study."""
    shipped = {p.stem for p in (ROOT / "examples").glob("*.yaml")}
    assert shipped == set(GPU_EXAMPLES) | CPU_EXAMPLES


@pytest.mark.parametrize("name", sorted(GPU_EXAMPLES))
def test_every_shipped_gpu_example_fits_with_margin(name):
    """Each shipped GPU config, planned for its GPUs (H100 80GB): every phase leaves >= 5 % of the GPU free and
    vLLM's share can start next to the trainer's state (megatron-spark train refuses otherwise)."""
    from megatron_spark.config import load_config
    from megatron_spark.planner.fit import check_fit
    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.memory import GIB
    from megatron_spark.planner.model import load_model

    model, gpus = GPU_EXAMPLES[name]
    cfg = load_config(ROOT / "examples" / f"{name}.yaml", ["model.hf_dir=null"])
    fit = check_fit(cfg, load_model(model), gpus, gpu("h100-80gb").memory_gib * GIB)
    assert fit.ok, fit.problems
    assert max(fit.phases["train"], fit.phases["rollout"]) <= 0.95 * fit.gpu_bytes


@pytest.mark.parametrize("name", sorted(GPU_EXAMPLES))
def test_the_plan_and_the_fit_check_give_one_answer(name):
    """`megatron-spark plan --config` once printed "peak 77.2 GiB (rollout) ... fits" and, on the next line,
    "rollout 63.9 GiB": its own model filled the GPU with KV cache, the fit check used vLLM's configured share, and
    they kept different margins. One rollout peak, one verdict."""
    from dataclasses import replace

    from megatron_spark.config import load_config
    from megatron_spark.planner.fit import check_fit
    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.memory import GIB
    from megatron_spark.planner.model import load_model
    from megatron_spark.planner.search import evaluate, from_config

    model, gpus = GPU_EXAMPLES[name]
    cfg = load_config(ROOT / "examples" / f"{name}.yaml", ["model.hf_dir=null"])
    shape, hw = load_model(model), gpu("h100-80gb")
    fit = check_fit(cfg, shape, gpus, hw.memory_gib * GIB)
    layout, work = from_config(cfg)
    if cfg.rollout.placement == "colocated":
        plan = evaluate(shape, replace(layout, dp=gpus // (layout.tp * layout.pp)), work, hw, 8, 0.3)
        assert abs(max(m.rollout for m in plan.memory) - fit.phases["rollout"]) < 0.1 * GIB
        assert plan.feasible == fit.ok
        assert 1 <= plan.peak.concurrency <= cfg.rollout.max_num_seqs


def test_a_layout_that_does_not_fit_is_refused_with_the_phase_numbers_and_fix():
    """The previous Spark-VL-7B example (TP2, no SP, vLLM share 0.5): the update needs ~103 GiB and vLLM could not
    start; each problem names its phase, the numbers and the field to change."""
    from megatron_spark.config import load_config
    from megatron_spark.planner.fit import check_fit
    from megatron_spark.planner.memory import GIB
    from megatron_spark.planner.model import load_model

    cfg = load_config(ROOT / "examples" / "spark_vl_7b.yaml",
                      ["model.hf_dir=null", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false",
                       "rollout.gpu_memory_utilization=0.5"])
    fit = check_fit(cfg, load_model("qwen2.5-vl-7b"), 8, 79.2 * GIB)
    assert not fit.ok and len(fit.problems) == 2
    train, rollout = fit.problems
    assert train.startswith("train: stage 0 needs 103.") and "model.recompute_activations=full" in train \
        and "parallel.sequence_parallel=true" in train
    assert rollout.startswith("rollout: rollout.gpu_memory_utilization=0.5") and "will not start" in rollout
    # sequence parallelism and recompute change the verdict: the planner reads both fields
    def train_gib(*overrides):
        c = load_config(ROOT / "examples" / "spark_vl_7b.yaml", ["model.hf_dir=null", *overrides])
        return check_fit(c, load_model("qwen2.5-vl-7b"), 8, 79.2 * GIB).phases["train"] / GIB
    assert train_gib() < train_gib("parallel.sequence_parallel=false")
    assert train_gib("model.recompute_activations=full") < train_gib()


def test_parameter_counts_read_at_every_size():
    """The exact digits first, then a rounded form in a unit that suits the size: a 5 M model is not '0.00 B'."""
    from megatron_spark.planner.search import count

    assert count(33_452_718_336) == "33,452,718,336 (33.45 B)"
    assert count(4_812_800) == "4,812,800 (4.81 M)"
    assert count(6_400) == "6,400 (6.40 K)" and count(12) == "12"


def test_the_planner_counts_what_freezing_saves():
    """model.freeze=[vision] on Qwen2.5-VL-32B at TP8 PP2: stage 0 saves exactly the vision tower's (without its
    merger) fp32 gradient and optimizer bytes per rank; the parameters themselves stay."""
    from dataclasses import replace

    shape = load_model("qwen2.5-vl-32b")
    layout = Layout(tp=8, pp=2, dp=1, rollout_tp=4, recompute="full", distributed_optimizer=False)
    work = Workload(prompt_len=1024, response_len=512)
    base = plan_memory(shape, layout, work, 79.2 * GIB)
    cold = plan_memory(shape, replace(layout, freeze=("vision",)), work, 79.2 * GIB)
    vision = stage_params(shape, 8, 2, freeze=("vision",))[0].frozen
    assert 0 < vision < stage_params(shape, 8, 2)[0].vision  # the tower without the merger, per TP rank
    assert base[0].params == cold[0].params and base[1].static == cold[1].static
    assert base[0].grads - cold[0].grads == vision * 4  # fp32 gradient buffer
    assert base[0].optimizer - cold[0].optimizer == vision * 12  # fp32 master copy + two Adam moments (bf16)


def test_the_log_prob_passes_follow_what_the_trainer_runs():
    """A period consumed by one optimizer step runs no old-log-prob pass (only the reference's, for KL); with 8
    steps per period 7/8 of the samples need it; algorithm.old_logprobs=engine needs none."""
    from dataclasses import replace

    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.steptime import plan_time

    shape, layout = load_model("qwen2.5-7b"), Layout(tp=4, dp=2)
    one = Workload(prompts=64, n_samples=8)
    eight = replace(one, global_batch=64)
    t = lambda w, kl=True: plan_time(shape, layout, w, gpu("h100-80gb"), 8, kl=kl).logprobs  # noqa: E731
    assert t(eight) == pytest.approx(t(one) * (1 + 7 / 8))
    assert t(replace(eight, old_logprobs="engine")) == pytest.approx(t(one))
    assert t(one, kl=False) == 0.0


def test_train_refuses_a_layout_that_does_not_fit_before_any_process_starts(tmp_path, monkeypatch, capsys):
    """`megatron-spark train` on a GPU: the planner's verdict for the job's layout is asked before torchrun starts;
    a layout that does not fit is one error naming the phases and the fix, and `--force` turns it into a warning.
    (The GPU's size is the only thing faked: the CPU test machine has none.)"""
    import json

    from megatron_spark.config import load_config
    from megatron_spark.planner import fit
    from megatron_spark.planner.model import BUILTIN
    from megatron_spark.train import prelaunch_check

    hf = tmp_path / "qwen2.5-vl-7b"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(BUILTIN["qwen2.5-vl-7b"]))
    monkeypatch.setattr(fit, "gpu_memory_bytes", lambda: 79.2 * GIB)
    monkeypatch.setattr("megatron_spark.compat.have_transformer_engine", lambda: True)  # as on the cluster
    bad = load_config(ROOT / "examples" / "spark_vl_7b.yaml",
                      [f"model.hf_dir={hf}", "parallel.tensor_model_parallel_size=2",
                       "parallel.sequence_parallel=false", "rollout.gpu_memory_utilization=0.5"])
    with pytest.raises(ValueError) as e:
        prelaunch_check(bad, 8)
    msg = str(e.value)
    assert "does not fit 8 GPU(s) of 79 GiB" in msg and "train: stage 0 needs 10" in msg and "--force" in msg
    assert "rollout.gpu_memory_utilization=0.5" in msg
    assert prelaunch_check(bad, 8, force=True) is not None
    assert "(--force: starting anyway)" in capsys.readouterr().err
    good = load_config(ROOT / "examples" / "spark_vl_7b.yaml", [f"model.hf_dir={hf}"])
    assert prelaunch_check(good, 8) is not None and capsys.readouterr().err == ""
    # the same example where Transformer Engine does not import: unfused attention at 8k tokens cannot fit
    monkeypatch.setattr("megatron_spark.compat.have_transformer_engine", lambda: False)
    with pytest.raises(ValueError, match="Transformer Engine does not import here"):
        prelaunch_check(good, 8)


def test_the_attention_kind_follows_the_transformer_impl():
    """The local spec (or `auto` without a working TE) materialises attention scores, and the vision tower's dense
    window masks: the planner's activation term grows with s^2 there and the fit check sees it."""
    from megatron_spark.config import load_config
    from megatron_spark.planner.fit import check_fit
    from megatron_spark.planner.search import attention_kind

    assert attention_kind("local") == "unfused" and attention_kind("auto", te_available=False) == "unfused"
    assert attention_kind("auto") == attention_kind("auto", True) == attention_kind("transformer_engine") == "flash"

    def train_gib(*overrides, te=None):
        c = load_config(ROOT / "examples" / "spark_vl_7b.yaml", ["model.hf_dir=null", *overrides])
        return check_fit(c, load_model("qwen2.5-vl-7b"), 8, 79.2 * GIB, te_available=te).phases["train"] / GIB
    assert train_gib("model.transformer_impl=local") > train_gib() + 1
    assert train_gib(te=False) == train_gib("model.transformer_impl=local")


@pytest.mark.slow
def test_model_means_what_it_means_in_eval(tiny_models, tmp_path):
    """`plan --model` takes what `eval --model` takes: a HF directory or a Megatron checkpoint (the model it holds)."""
    from megatron_spark.convert.converters import hf_to_megatron

    hf = tiny_models["vl"] if "vl" in tiny_models else next(iter(tiny_models.values()))
    ckpt = hf_to_megatron(hf, tmp_path / "mg").out
    assert load_model(str(ckpt)) == load_model(hf)
    assert load_model(str(ckpt / "iter_0000000")) == load_model(hf)
    with pytest.raises(ValueError, match="nor a Megatron checkpoint"):
        load_model(str(tmp_path / "nothing"))


def test_placements_compare_colocated_split_and_overlap():
    """The three placements on 32 H100 (SPARK's step, 32B): the overlapped split's step is the larger phase plus
    the sync, the synchronous split's is their sum; a split pays for the GPUs that do not train."""
    from megatron_spark.planner import placements
    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.memory import Workload
    from megatron_spark.planner.model import load_model

    work = Workload(64, 64, 8, 1024, 1024, 1024, 1, None, 256, "bf16", "flash")
    best = {p.mode: p for p in placements.compare(load_model("qwen2.5-vl-32b"), 32, 8, gpu("h100-80gb"), work)}
    assert set(best) == {"colocated", "disaggregated", "one-step off-policy"}
    split, overlap = best["disaggregated"], best["one-step off-policy"]
    assert split.train == overlap.train and split.rollout_gpus == overlap.rollout_gpus > 0
    assert split.gpus == overlap.gpus == best["colocated"].gpus == 32
    assert overlap.step == pytest.approx(max(overlap.generation, overlap.training) + overlap.sync)
    assert split.step == pytest.approx(split.generation + split.training + split.sync)
    assert overlap.tokens_per_gpu_s() > split.tokens_per_gpu_s()


def test_a_disaggregated_config_is_fitted_as_two_kinds_of_gpu():
    """The trainer's layout spans the training GPUs only and the engines' GPUs hold vLLM alone: at 0.9 of the GPU
    the off-policy example fits, the same share colocated would not."""
    from megatron_spark.config import load_config
    from megatron_spark.planner.fit import check_fit
    from megatron_spark.planner.hardware import gpu
    from megatron_spark.planner.memory import GIB
    from megatron_spark.planner.model import load_model

    shape, gpu_bytes = load_model("qwen2.5-vl-32b"), gpu("h100-80gb").memory_gib * GIB
    path = ROOT / "examples" / "spark_vl_32b_offpolicy.yaml"
    assert check_fit(load_config(path, ["model.hf_dir=null"]), shape, 24, gpu_bytes).ok
    colocated = load_config(path, ["model.hf_dir=null", "rollout.placement=colocated", "rollout.num_ranks=0",
                                   "algorithm.max_staleness=0"])
    assert any("rollout.gpu_memory_utilization" in p for p in check_fit(colocated, shape, 24, gpu_bytes).problems)
