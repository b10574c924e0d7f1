"""Config loading, dotted overrides and the validation errors users hit first."""
import dataclasses
from pathlib import Path

import pytest

from megatron_spark.config import SparkConfig, load_config


def test_defaults_validate():
    load_config().validate(world_size=8)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  temperature: 0.7\ntraining:\n  lr: 1.0e-6\n")
    assert load_config(None, ["training.lr=5e-4"]).training.lr == 5e-4  # YAML reads this as a string
    cfg = load_config(p, ["rollout.n_samples_per_prompt=4", "parallel.tensor_model_parallel_size=2",
                          "algorithm.recycle.judge_cap=16", "model.hf_dir=null"])
    assert cfg.rollout.temperature == 0.7 and cfg.training.lr == 1e-6
    assert cfg.rollout.n_samples_per_prompt == 4 and cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.algorithm.recycle.judge_cap == 16 and cfg.model.hf_dir is None
    assert isinstance(cfg, SparkConfig)


def _bad(overrides, world_size=None, **model):
    from megatron_spark.config import ModelFacts

    cfg = load_config(None, overrides)
    with pytest.raises(ValueError) as e:
        cfg.validate(world_size, ModelFacts(**model))
    return str(e.value)


CASES = [
    # (overrides, model fields, world size, expected fragments)
    (["model.dtype=fp16"], {}, None, ["model.dtype", "loss scaling", "use bf16"]),
    (["rollout.max_num_seqs=0"], {}, None, ["rollout.max_num_seqs"]),
    (["algorithm.recycle.samples_per_task=1"], {}, None, ["algorithm.recycle.samples_per_task", "at least 2"]),
    (["algorithm.recycle.samples_per_task=3", "training.global_batch_size=128"], {}, None,
     ["algorithm.recycle.samples_per_task", "not a multiple of training.global_batch_size"]),
    (["eval.judge_votes=-1"], {}, None, ["eval.judge_votes"]),
    (["logging.sample_interval=-1"], {}, None, ["logging.sample_interval"]),
    (["parallel.tensor_model_parallel_size=3"], {"num_key_value_heads": 8}, None,
     ["parallel.tensor_model_parallel_size", "TP 3: the model has 8 KV heads; TP must divide them"]),
    (["parallel.pipeline_model_parallel_size=8"], {"num_layers": 4}, None,
     ["parallel.pipeline_model_parallel_size", "exceeds the model's 4 layers"]),
    (["parallel.context_parallel_size=2"], {}, None, ["parallel.context_parallel_size", "not implemented",
                                                      "set it to 1"]),
    (["rollout.backend=hf", "rollout.tensor_parallel_size=2"], {}, None,
     ["rollout.tensor_parallel_size", "one transformers engine per rank"]),
    (["rollout.backend=hf", "rollout.quantization=fp8"], {}, None, ["rollout.quantization", "need a vLLM engine"]),
    (["parallel.tensor_model_parallel_size=4"], {}, 6, ["world size 6 is not a multiple of TP*PP*CP=4"]),
    (["rollout.n_samples_per_prompt=1"], {}, None, ["rollout.n_samples_per_prompt", "at least 2 samples"]),
    (["checkpoint.hf_interval=10"], {}, None, ["checkpoint.hf_interval", "set checkpoint.dir"]),
    # the rule the converters and the planner applied and the config did not (rollout TP below the KV heads)
    (["rollout.tensor_parallel_size=3"], {"num_key_value_heads": 8}, None,
     ["rollout.tensor_parallel_size", "rollout TP 3: vLLM needs a TP that divides the model's 8 KV heads"]),
    (["checkpoint.hf_interval=-1"], {}, None, ["checkpoint.hf_interval", "0 turns the HF export off"]),
    (["checkpoint.dir=/tmp/ck", "checkpoint.hf_interval=5", "checkpoint.hf_keep_last=0"], {}, None,
     ["checkpoint.hf_keep_last", "must be > 0"]),
    (["algorithm.recycle.pointwise_prob_mixed=1.5"], {}, None,
     ["algorithm.recycle.pointwise_prob_mixed", "probability"]),
    (["training.global_batch_size=60"], {}, None, ["training.global_batch_size", "multiple of"]),
    (["parallel.virtual_pipeline_model_parallel_size=2"], {}, None,
     ["parallel.virtual_pipeline_model_parallel_size", "pipeline_model_parallel_size > 1"]),
    (["rollout.top_p=0"], {}, None, ["rollout.top_p", "(0, 1]"]),
    (["data.train_file=/nonexistent/train.json"], {}, None, ["data.train_file", "does not exist"]),
    (["parallel.sequence_parallel=true"], {}, None, ["parallel.sequence_parallel", "needs TP > 1"]),
    (["rollout.max_model_len=100"], {}, None, ["rollout.max_model_len"]),
    (["parallel.tensor_model_parallel_size=4"], {"vision_num_heads": 6}, None, ["vision tower's 6 heads"]),
    (["parallel.pipeline_model_parallel_size=4", "parallel.num_layers_in_first_pipeline_stage=3"],
     {"num_layers": 28}, None, ["parallel.num_layers_in_first_pipeline_stage", "leave 25 of the 28 layers for 3",
                                "unset both for [7, 7, 7, 7]"]),
    (["parallel.pipeline_model_parallel_size=2", "parallel.num_layers_in_last_pipeline_stage=0"],
     {"num_layers": 3}, None, ["parallel.num_layers_in_last_pipeline_stage", "must be >= 1"]),
    # disaggregated engines and one-step off-policy
    (["algorithm.max_staleness=1"], {}, None, ["algorithm.max_staleness", "rollout.placement=disaggregated"]),
    (["algorithm.max_staleness=2", "rollout.placement=disaggregated", "rollout.num_ranks=1"], {}, None,
     ["algorithm.max_staleness", "0 (synchronous) or 1"]),
    (["rollout.placement=disaggregated"], {}, None, ["rollout.num_ranks", "positive multiple"]),
    (["rollout.placement=disaggregated", "rollout.num_ranks=3", "rollout.tensor_parallel_size=2"], {}, None,
     ["rollout.num_ranks", "multiple of rollout.tensor_parallel_size=2"]),
    (["rollout.num_ranks=2"], {}, None, ["rollout.num_ranks", "set rollout.placement=disaggregated"]),
    (["rollout.placement=disaggregated", "rollout.num_ranks=2"], {}, 2, ["rollout.num_ranks", "no training rank"]),
    (["rollout.placement=disaggregated", "rollout.num_ranks=1", "parallel.tensor_model_parallel_size=2"], {}, 4,
     ["training ranks 3 (world 4 - rollout.num_ranks 1)", "TP*PP*CP=2"]),
    (["rollout.placement=disaggregated", "rollout.num_ranks=1", "algorithm.max_staleness=1",
      "algorithm.dynamic_sampling=true"], {}, None, ["algorithm.dynamic_sampling", "max_staleness=0"]),
    (["training.max_tokens_per_micro_batch=4096", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=2"], {}, None, ["training.max_tokens_per_micro_batch"]),
]


@pytest.mark.parametrize("layers,pp,first,last,want", [
    (3, 2, None, None, [1, 2]),                      # the first stage (embedding, vision tower) holds fewer
    (28, 8, None, None, [2, 4, 4, 4, 4, 4, 4, 2]),   # Qwen2.5-VL-7B at PP=8
    (64, 4, None, None, [16, 16, 16, 16]),
    (29, 8, None, None, [2, 4, 4, 4, 4, 4, 4, 3]),
    (5, 4, None, None, [1, 1, 1, 2]),
    (28, 4, 1, 3, [1, 12, 12, 3]),
    (3, 2, 2, None, [2, 1]),
])
def test_pipeline_stage_layers(layers, pp, first, last, want):
    from megatron_spark.parallel import stage_layers

    got = stage_layers(layers, pp, first, last)
    assert got == want and sum(got) == layers and min(got) >= 1
    assert got[0] <= got[-1] or first is not None
    load_config(None, [f"parallel.pipeline_model_parallel_size={pp}"] +
                ([f"parallel.num_layers_in_first_pipeline_stage={first}"] if first else []) +
                ([f"parallel.num_layers_in_last_pipeline_stage={last}"] if last else [])).validate()


@pytest.mark.parametrize("overrides,model,world,fragments", CASES)
def test_validation_errors_name_field_and_fix(overrides, model, world, fragments):
    msg = _bad(overrides, world, **model)
    for f in fragments:
        assert f in msg, msg


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ValueError, match=r"rollout.tmperature.*did you mean 'rollout.temperature'"):
        load_config(None, ["rollout.tmperature=0.5"])


def test_type_errors_name_the_field():
    with pytest.raises(ValueError, match=r"training.micro_batch_size.*expected an integer"):
        load_config(None, ["training.micro_batch_size=abc"])
    with pytest.raises(ValueError, match=r"model.dtype.*choose one of"):
        load_config(None, ["model.dtype=fp8"])


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(None, ["training.lr"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_example_configs_validate():
    from pathlib import Path

    paths = sorted(Path(__file__).resolve().parents[2].glob("examples/*.yaml"))
    assert len(paths) >= 3
    for p in paths:
        # the cluster configs point at model dirs that do not exist here
        load_config(p, ["model.hf_dir=null", "checkpoint.dir=null"]).validate()


def test_eval_section_errors_name_the_field(tmp_path):
    from megatron_spark.config import load_config

    with pytest.raises(ValueError, match=r"'eval.file': eval.interval=5 needs a held-out file"):
        load_config(None, ["eval.interval=5"]).validate()
    with pytest.raises(ValueError, match=r"'eval.file': '.*nope.json' does not exist"):
        load_config(None, [f"eval.file={tmp_path}/nope.json"]).validate()
    with pytest.raises(ValueError, match=r"'eval.interval': must be >= 0"):
        load_config(None, ["eval.interval=-1"]).validate()


@pytest.mark.slow
def test_train_cli_refuses_a_layout_the_model_cannot_take_before_starting(tiny_models):
    """`megatron-spark train` checks the layout against the model's config.json before launching torchrun."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--config",
                        str(root / "examples" / "tiny_cpu.yaml"), "--nproc-per-node", "2",
                        f"model.hf_dir={tiny_models['q2_tied']}", "parallel.pipeline_model_parallel_size=2",
                        "parallel.tensor_model_parallel_size=1", "rollout.tensor_parallel_size=1",
                        "parallel.num_layers_in_first_pipeline_stage=3"],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: config field 'parallel.num_layers_in_first_pipeline"
                                                         "_stage'")
    assert "torch.distributed" not in p.stderr and "Traceback" not in p.stderr


def test_yaml_booleans_for_off_and_none_choices():
    """YAML reads a bare off / no as false: a choice named off or none still gets it, other choices say so."""
    from megatron_spark.config import load_config

    assert load_config(None, ["algorithm.rollout_is=off"]).algorithm.rollout_is == "off"
    assert load_config(None, ["rollout.quantization=off"]).rollout.quantization == "none"
    assert load_config(None, ["rollout.quantization=no"]).rollout.quantization == "none"
    with pytest.raises(ValueError, match=r"'rollout.quantization': got True.*YAML reads"):
        load_config(None, ["rollout.quantization=yes"])


def test_removed_fields_say_what_replaced_them():
    with pytest.raises(ValueError, match=r"'model.family': no longer exists: the model family is read from"):
        load_config(None, ["model.family=qwen2"])
    with pytest.raises(ValueError, match=r"'data.eval_file': no longer exists: .*eval.file"):
        load_config(None, ["data.eval_file=x.json"])


def test_recompute_takes_booleans_and_modes():
    assert load_config(None, ["model.recompute_activations=true"]).model.recompute_activations == "full"
    assert load_config(None, ["model.recompute_activations=false"]).model.recompute_activations == "none"
    assert load_config(None, ["model.recompute_activations=selective"]).model.recompute_activations == "selective"
    with pytest.raises(ValueError, match=r"model.recompute_activations.*choose one of"):
        load_config(None, ["model.recompute_activations=some"])


@pytest.mark.slow
def test_every_field_is_documented_and_listed_by_help_config():
    """Fields are documented where they are declared (comments in config.py); `megatron-spark train --help-config`
    lists every one with its type and default."""
    import subprocess
    import sys
    from pathlib import Path

    from megatron_spark.config import field_docs, leaf_paths

    docs = field_docs()
    assert [p for p in leaf_paths().values() if not docs.get(p)] == []
    assert docs["model.megatron_ckpt"].endswith("hf_dir still gives config and tokenizer")  # a continued comment
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "train", "--help-config"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert p.returncode == 0
    listed = [x.split("  (")[0] for x in p.stdout.splitlines() if not x.startswith(" ")]
    assert listed == list(leaf_paths().values())
    assert "rollout.backend  (Literal['vllm', 'hf'], default 'vllm')" in p.stdout


def test_every_cli_flag_has_help_and_parallel_sizes_are_named_alike():
    """`megatron-spark ... --help` documents every flag; the trainer's TP is --train-tp and the engines' TP is
    --rollout-tp wherever a command takes them (older spellings stay as aliases)."""
    import argparse

    from megatron_spark.cli import build_parser

    missing, flags = [], {}

    def walk(parser, prefix):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, prefix + [name])
            elif not isinstance(a, argparse._HelpAction):
                name = " ".join(prefix + [a.option_strings[0] if a.option_strings else a.dest])
                if not a.help:
                    missing.append(name)
                flags[name] = a.option_strings
    walk(build_parser(), [])
    assert missing == []
    assert "--train-tp" in flags["verify-sync --train-tp"] and "--rollout-tp" in flags["verify-sync --rollout-tp"]
    assert "--rollout-tp" in flags["eval --tensor-parallel-size"]
    for sub in ("hf-to-megatron", "verify"):
        assert "--train-tp" in flags[f"convert {sub} --train-tp"] and "--tp" in flags[f"convert {sub} --train-tp"]


def test_every_section_has_owners_that_exist():
    """`config.SECTION_OWNERS` names an owner for every section of the tree, and each owner is a real module or
    package (the e2e tier checks the reads against it: tests/e2e/test_train.py)."""
    from megatron_spark.config import SECTION_OWNERS, leaf_paths, owns

    root = Path(__file__).resolve().parents[2] / "megatron_spark"
    assert {p.rsplit(".", 1)[0] for p in leaf_paths().values()} == set(SECTION_OWNERS)
    for owners in SECTION_OWNERS.values():
        for o in owners:
            assert (root / f"{o}.py").is_file() or (root / o / "__init__.py").is_file(), o
    assert owns("megatron_spark.rollout.build", "rollout.backend") and owns("__main__", "eval.file")
    assert not owns("megatron_spark.trainer", "rollout.max_new_tokens")  # the rollouts' Sampling holds it
    assert not owns("megatron_spark.trainer", "eval.interval")           # the HeldOutEval component's


def test_the_engine_runs_the_batch_the_planner_assumes(monkeypatch):
    """The engine once ran vLLM's 64 sequences (not a config field) while the planner assumed 256: the rollout
    section's max_num_seqs reaches both."""
    from types import SimpleNamespace

    from megatron_spark.planner.search import from_config
    from megatron_spark.rollout import build, engine

    seen = {}
    monkeypatch.setattr(engine, "RolloutEngine", lambda hf_dir, **kw: seen.update(kw))
    cfg = load_config(None, ["rollout.max_num_seqs=77"])
    shape = SimpleNamespace(vision=None, text=SimpleNamespace(tied_embeddings=False))
    build.build_engine(cfg.rollout, "model", shape, dtype="bf16", seed=0, min_pixels=1, max_pixels=2)
    assert seen["max_num_seqs"] == 77 == from_config(cfg)[1].max_num_seqs
    assert seen["sleep_mode"] is True  # (colocated: it shares the GPU with training)
    build.build_engine(load_config(None, ["rollout.placement=disaggregated"]).rollout, "model", shape, dtype="bf16",
                       seed=0, min_pixels=1, max_pixels=2)
    assert seen["sleep_mode"] is False and seen["max_num_seqs"] == 256


def test_every_section_validates_itself_and_the_package_has_no_import_circle():
    """Each section of the tree has its own check (validation.SECTION_CHECKS), and no module of the package imports
    one that imports it back, lazily or not (config and parallel once did; layout_rules is the leaf both use)."""
    import ast

    from megatron_spark.config import SparkConfig
    from megatron_spark.validation import SECTION_CHECKS

    assert list(SECTION_CHECKS) == [f.name for f in dataclasses.fields(SparkConfig)]
    root = Path(__file__).resolve().parents[2]
    modules = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
               for f in (root / "megatron_spark").rglob("*.py")}
    imports = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_spark"):
                imports[m] |= {t for t in [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                               if t in modules}
            elif isinstance(node, ast.Import):
                imports[m] |= {a.name for a in node.names if a.name in modules}

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for n in imports[todo.pop()] - seen:
                if n == b:
                    return True
                seen.add(n)
                todo.append(n)
        return False

    assert [m for m in modules if reaches(m, m)] == []
