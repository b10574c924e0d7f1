"""Evaluation as trained: for the same item, the prompt `megatron-spark eval` sends under the trained protocol is,
token for token, the prompt training rolls out (task, pointwise judge, pairwise judge, reflection); and every
request of a batch samples with its own seed."""
import pytest

from megatron_spark.data import PromptBuilder, load_records
from megatron_spark.evaluation import reward_bench as rb
from megatron_spark.evaluation.backends import spark_messages
from megatron_spark.evaluation.items import load_items
from megatron_spark.evaluation.protocol import TrainedPrompts
from megatron_spark.evaluation.runner import math_prompt
from megatron_spark.evaluation.backends import conversation
from megatron_spark.evaluation.settings import EvalSettings
from megatron_spark.recycle import AuxTask, pairwise_task, pointwise_task, task_messages
from megatron_spark.reflection import default_templates
from megatron_spark.templates import TemplateBank, strip_suffix

PIXELS = 3136


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The demo's model, data, templates and prompt protocol."""
    from pathlib import Path

    from megatron_spark.fixtures.shapes import make_shapes_benchmark, make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2_5_vl

    root = tmp_path_factory.mktemp("as_trained")
    hf = build_qwen2_5_vl(root / "model", min_pixels=PIXELS, max_pixels=PIXELS)
    # a chat template whose default system turn is not the paper protocol's system prompt (as SmolLM2's): the
    # comparison then also sees a system prompt that training did not use
    for f in hf.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja") and "You are a helpful assistant." in f.read_text():
            f.write_text(f.read_text().replace("You are a helpful assistant.", "You are a tiny model."))
    train = make_shapes_task(root / "train", 8, seed=3)
    bench = make_shapes_benchmark(root / "bench", 8, seed=3)  # (the same seed: the same pictures and answers)
    templates = Path(__file__).resolve().parents[2] / "examples" / "templates" / "tiny.yaml"
    protocol = TrainedPrompts(1.0, 1.0, -1, 16, PIXELS, PIXELS, templates.read_text())
    return {"hf": str(hf), "train": train, "bench": bench, "protocol": protocol,
            "builder": PromptBuilder(str(hf), True, PIXELS, PIXELS), "bank": TemplateBank.parse(protocol.templates)}


def _eval_ids(setting, conv) -> list[int]:
    """The token ids the trained protocol's vLLM backend sends for an evaluation conversation."""
    return setting["builder"].build(spark_messages(conv)).input_ids


def _settings(setting, fmt: str) -> EvalSettings:
    p = setting["protocol"]
    return EvalSettings("m", fmt, "trained", templates=p.templates, generation=p.generation())


def test_task_prompt_is_the_training_prompt(setting):
    examples, _ = load_records(setting["train"])
    _, items = load_items(setting["bench"])
    s = _settings(setting, "spark")
    for ex, it in zip(examples, items):
        train_ids = setting["builder"].build(ex.messages).input_ids
        conv = conversation(math_prompt(it, s), it.image_path, s.generation.system_prompt)
        assert _eval_ids(setting, conv) == train_ids


def test_judge_and_reflection_prompts_are_the_training_prompts(setting):
    """Training builds judge and reflection tasks by recycling (`recycle.pointwise_task` / `pairwise_task`, the
    reflection templates) and rolls them out as `task_messages`; evaluation builds them from judge.json items and
    self-reflection."""
    examples, _ = load_records(setting["train"])
    _, judge_items = load_items(setting["bench"].parent / "judge.json")
    s, bank = _settings(setting, "judge"), setting["bank"]
    fixed = bank.judge_templates()
    checked = set()
    for it in judge_items:
        q = it.question
        kind = it.dataset.split("/")[1]
        if kind == "pointwise":
            task = pointwise_task(fixed["pointwise"], q, it.answers[0], it.label == "Yes", it.image_path, 0)
        else:
            good, bad = (it.answers[0], it.answers[1]) if it.label == "A" else (it.answers[1], it.answers[0])
            task = pairwise_task(fixed["pairwise"], q, good, bad, it.label == "A", it.image_path, 0)
        train_ids = setting["builder"].build(task_messages(task, 1048576)).input_ids
        verdict = next(r for r in rb.judge_requests(it, s, bank) if r.role == "verdict")
        assert _eval_ids(setting, verdict.conversation) == train_ids, kind
        checked.add(kind)
    assert checked == {"pointwise", "pairwise"}
    # reflection: the answer-reflection task of training vs the reflect call of test-time self-reflection
    _, reflect_t = default_templates(bank)
    _, items = load_items(setting["bench"])
    for ex, it in zip(examples, items):
        task = AuxTask("reflection_ans", reflect_t.render(question=strip_suffix(ex.question), answer="3"), ex.answer,
                       ex.image, 0)
        train_ids = setting["builder"].build(task_messages(task, 1048576)).input_ids
        conv = conversation(reflect_t.render(question=it.problem, answer="3"), it.image_path,
                            s.generation.system_prompt)
        assert _eval_ids(setting, conv) == train_ids


def test_protocol_round_trip_and_resolution(tmp_path, setting):
    import argparse

    from megatron_spark.evaluation.cli import add_eval_args, resolve_protocol, settings_from

    setting["protocol"].write(tmp_path)
    (tmp_path / "iter_0000002").mkdir()
    assert TrainedPrompts.read(tmp_path / "iter_0000002") == setting["protocol"]  # an iteration: its root's
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(["b.json", "--model", str(tmp_path), "--out", "o"])
    name, trained = resolve_protocol(args, "hf")
    assert name == "trained" and trained == setting["protocol"]
    s = settings_from(args, "judge", "m", name, trained)
    assert s.protocol == "trained" and s.generation.system_prompt is None and s.generation.max_tokens == 16
    assert s.votes == 8 and s.vote_temperature == 1.0 and s.generation.repetition_penalty == 1.0
    args = p.parse_args(["b.json", "--model", str(tmp_path), "--out", "o", "--max-tokens", "32"])
    s = settings_from(args, "judge", "m", *resolve_protocol(args, "hf"))
    assert s.protocol == "trained (changed: max_tokens)" and s.generation.max_tokens == 32
    args = p.parse_args(["b.json", "--model", str(tmp_path / "none"), "--out", "o"])
    name, trained = resolve_protocol(args, "hf")
    assert name == "paper" and settings_from(args, "spark", "m", name, trained).generation.repetition_penalty == 1.05
    args = p.parse_args(["b.json", "--model", str(tmp_path / "none"), "--out", "o", "--protocol", "trained"])
    with pytest.raises(Exception, match="prompt_protocol.json.*--protocol paper"):
        resolve_protocol(args, "hf")


def test_every_request_samples_with_its_own_seed():
    from megatron_spark.rollout.engine import request_seed

    seeds = [request_seed(7, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= x < 2 ** 63 for x in seeds)
    assert request_seed(7, 3) == request_seed(7, 3) != request_seed(8, 3)
