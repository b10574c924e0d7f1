"""The RL loop's pure pieces (batching.py, loss.py, samples.py, kinds.py, the fault plan), called as functions, and
the rules that keep the loop thin: the loop module's size, no half-built trainer in tests, task kinds named only
through their enum."""
import ast
import json
import random
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_spark.algorithm import BatchSize
from megatron_spark.batching import assemble, dp_share, dynamic_keep, global_batches, group_spread, recycle_groups
from megatron_spark.kinds import TaskKind
from megatron_spark.loss import GRPOLoss, MicroBatch
from megatron_spark.samples import ScoredSample, Task
from megatron_spark.watchdog import FaultPlan

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_spark"


def sample(n_prompt: int, n_response: int, name: str = "", reason: str = "stop"):
    return SimpleNamespace(prompt_token_ids=[0] * n_prompt, token_ids=[1] * n_response, finish_reason=reason,
                           name=name, text=name)


# -- the rules ----------------------------------------------------------------------------------------------------
def kind_literals(root: Path) -> list[str]:
    """String constants equal to a task kind's name (docstrings aside) in the package, outside kinds.py."""
    names, found = {k.value for k in TaskKind}, []
    for path in sorted(root.rglob("*.py")):
        if path.name == "kinds.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{path.relative_to(root.parent)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
                  and id(n) not in docs]
    return found


def test_task_kinds_are_named_only_through_their_enum(tmp_path):
    assert kind_literals(PACKAGE) == []
    # the check sees a literal where one is written (a copy of a module with the enum spelled out)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text('"""pairwise is fine in a docstring."""\nJUDGE = ("pointwise", "x")\n')
    assert kind_literals(tmp_path / "pkg") == ["pkg/m.py:2: 'pointwise'"]


def test_the_loop_module_is_thin_and_no_test_builds_half_a_trainer():
    assert len((PACKAGE / "trainer.py").read_text().splitlines()) < 250
    offenders = [p.name for p in (ROOT / "tests").rglob("*.py")
                 if "SparkTrainer.__new__" in p.read_text() and p.name != Path(__file__).name]
    assert offenders == []


def test_no_function_of_the_package_is_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_a_kind_is_its_name_in_text_and_an_enum_in_code():
    t = Task("e0-1", [], "3", None, "q", "pointwise")  # as a checkpoint (or a data file) stores it
    assert t.kind is TaskKind.POINTWISE and t.kind == "pointwise" and f"{t.kind}_accuracy" == "pointwise_accuracy"
    assert json.loads(json.dumps(asdict(t)))["kind"] == "pointwise"
    assert Task(**json.loads(json.dumps(asdict(t)))).kind is TaskKind.POINTWISE
    assert TaskKind.PAIRWISE.is_judge and TaskKind.REFLECTION_ANS.is_reflection and not TaskKind.TASK.is_judge
    with pytest.raises(ValueError):
        Task("x", [], "1", None, "q", "judge")


# -- batching -----------------------------------------------------------------------------------------------------
def test_group_spread_and_what_dynamic_sampling_keeps():
    outs = [["a", "b"], ["c", "d"], ["e"], ["f", "g"]]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.5]
    assert group_spread(outs, rewards) == [True, False, False, False]
    # the first `target` groups with spread, in generation order; filled up with groups without spread, sorted
    assert dynamic_keep([False, True, True, False, True], 2) == [1, 2]
    assert dynamic_keep([False, True, False, False], 3) == [0, 1, 2]
    assert dynamic_keep([False, False], 0) == []


def test_global_batches_carry_typed_scored_samples_with_group_advantages():
    outs = [[sample(3, 2, "p0a"), sample(3, 4, "p0b")], [sample(5, 1, "p1a"), sample(5, 1, "p1b")]]
    batches = global_batches(outs, [1.0, 0.0, 1.0, 1.0], 2, random.Random(0))
    assert [len(b) for b in batches] == [2, 2] and all(isinstance(x, ScoredSample) for b in batches for x in b)
    by_name = {x.sample.name: x for b in batches for x in b}
    assert by_name["p0a"].advantage > 0 > by_name["p0b"].advantage and by_name["p1a"].advantage == 0
    assert (by_name["p0b"].prompt, by_name["p0b"].reward, by_name["p0b"].tokens) == (0, 0.0, 7)
    # a remainder smaller than a batch is dropped; the shuffle is the rng's (the same on every rank)
    assert len(global_batches(outs, [1.0, 0.0, 1.0, 1.0], 3, random.Random(0))) == 1
    again = global_batches(outs, [1.0, 0.0, 1.0, 1.0], 2, random.Random(0))
    assert [[x.sample.name for x in b] for b in again] == [[x.sample.name for x in b] for b in batches]


def test_dp_shares_cover_a_batch_once_balanced_and_longest_first():
    batch = [ScoredSample(i, sample(10, n), 0.0, 0.0) for i, n in enumerate([50, 5, 40, 10, 30, 20])]
    shares = [dp_share(batch, 2, r) for r in range(2)]
    assert sorted(x.prompt for s in shares for x in s) == list(range(6))
    costs = [sum(x.tokens for x in s) for s in shares]
    assert abs(costs[0] - costs[1]) <= 10
    assert all([x.tokens for x in s] == sorted((x.tokens for x in s), reverse=True) for s in shares)
    assert dp_share(batch, 1, 0) == sorted(batch, key=lambda x: -x.tokens)


def test_engine_shares_are_put_back_in_prompt_order_and_a_lost_prompt_is_an_error():
    works = [SimpleNamespace(prompts=[2, 0], samples=[["c1", "c2"], ["a1"]], seconds=2.0),
             SimpleNamespace(prompts=[1], samples=[["b1"]], seconds=1.0)]
    outs, m = assemble("infer", 3, works)
    assert outs == [["a1"], ["b1"], ["c1", "c2"]]
    assert (m["infer/samples_generated"], m["infer/engine_samples_min"], m["infer/engine_samples_max"]) == (4, 1, 3)
    assert m["time/infer_engine_rollout_mean"] == 1.5
    with pytest.raises(RuntimeError, match=r"prompts \[3\] were generated by no engine"):
        assemble("infer", 4, works)


def test_recycled_groups_are_keyed_by_prompt_with_their_own_rewards():
    tasks = [Task("e0-7", [], "4", None, "q7"), Task("e0-2", [], "1", "img.png", "q2")]
    outs = [[SimpleNamespace(token_ids=[1, 2])], [SimpleNamespace(token_ids=[3]), SimpleNamespace(token_ids=[4])]]
    groups = recycle_groups(tasks, outs, [1.0, 0.0, 1.0], lambda ids: "-".join(map(str, ids)))
    assert [(g.prompt_id, g.question, g.answer, g.image, g.responses, g.rewards) for g in groups] == [
        ("e0-7", "q7", "4", None, ["1-2"], [1.0]), ("e0-2", "q2", "1", "img.png", ["3", "4"], [0.0, 1.0])]


# -- the loss -----------------------------------------------------------------------------------------------------
def alg(**kw):
    base = dict(rollout_is="off", rollout_is_cap=2.0, kl_coef=0.0, eps_clip_low=0.2, eps_clip_high=0.2,
                entropy_coef=0.0, loss_reduction="token_mean", loss_normalization="global_batch")
    return SimpleNamespace(**{**base, **kw})


def test_the_loss_owns_its_normalisation():
    """global_batch: a micro-batch's loss is its share of the batch (its token sum over the batch's tokens), and the
    policy is told to add shares up; micro_batch: the micro-batch's own mean, averaged by megatron-core."""
    logp = torch.zeros(1, 4)
    mb = MicroBatch(mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]), old=logp, ref=logp, adv=torch.tensor([2.0]),
                    rollout=logp)
    size = BatchSize(tokens=12, sequences=4)
    share = GRPOLoss(alg()).for_batch(size)
    assert share.share_of_batch and share(logp, mb)[0].item() == pytest.approx(-2.0 * 3 / 12)
    own = GRPOLoss(alg(loss_normalization="micro_batch")).for_batch(size)
    assert not own.share_of_batch and own(logp, mb)[0].item() == pytest.approx(-2.0)
    poisoned = GRPOLoss(alg()).scaled(float("nan")).for_batch(size)
    assert torch.isnan(poisoned(logp, mb)[0]) and GRPOLoss(alg()).scaled(None).scale is None


def test_the_fault_plan_is_read_at_the_entry_point_and_inert_by_default():
    assert FaultPlan() == FaultPlan.from_env({})
    plan = FaultPlan.from_env({"SPARK_TEST_FAULTS": json.dumps({"kill": [1, 3, 0], "nonfinite": [2, 5]}),
                               "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (plan.kill, plan.hang, plan.nonfinite, plan.attempt) == ((1, 3, 0), None, (2, 5), 1)
    assert plan.loss_scale(3) is None and plan.loss_scale(5) != plan.loss_scale(5)  # NaN
    plan.at_step(3, 1)  # another rank: nothing happens
    FaultPlan().at_step(1, 0)
    # the loop reads no environment: the trainer, the update and the loss modules never name the variable
    for name in ("trainer.py", "update.py", "generation.py", "loss.py"):
        assert "os.environ" not in (PACKAGE / name).read_text()


def test_checkpointed_tasks_hold_kinds_by_name(tmp_path):
    """The recycling queue and the round in flight go into checkpoints that torch loads with weights_only: their
    kinds are stored as names (an enum there would make the resume fail) and come back as the enum."""
    from megatron_spark.offpolicy import InFlight, Round
    from megatron_spark.recycle import AuxQueue, AuxTask

    queue = AuxQueue(2)
    queue.start_episode(0)
    queue.push([AuxTask(TaskKind.PAIRWISE, "which?", "A", None, "p0")])
    slot = InFlight(max_staleness=1, receive=None)
    slot.round = Round(3, 2, 0, [("reward", [Task("s2-0", [], "A", None, "which?", TaskKind.PAIRWISE)])],
                       received=[([[]], {})])
    torch.save({"queue": queue.state_dict(), "inflight": slot.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    queue.load_state_dict(state["queue"])
    slot.load_state_dict(state["inflight"])
    assert queue.items[0].kind is TaskKind.PAIRWISE and slot.round.parts[0][1][0].kind is TaskKind.PAIRWISE


def test_generate_all_gives_every_rank_every_engines_samples_in_prompt_order():
    """The held-out evaluation's path through the Rollouts protocol: each engine its share, sampling overrides
    (n among them) handed through, prompts built only where an engine asks for them."""
    from megatron_spark.rollout.protocols import EngineWork, generate_all

    class TwoEngines:
        sampling, sync = None, None

        def submit(self, parts):
            self.parts = parts
            return 7

        def collect(self, ticket):
            part = self.parts[0]
            shares = ([0, 1], [2])
            return [[EngineWork(s, [[f"{part.request(i)}:n{part.overrides['n']}:s{part.seed(e)}"] for i in s], 0.1)
                     for e, s in enumerate(shares)]]

    built = []
    outs = generate_all(TwoEngines(), lambda i: built.append(i) or f"p{i}", 3, seed=5, n=4, temperature=0.0)
    assert outs == [["p0:n4:s5"], ["p1:n4:s5"], ["p2:n4:s5"]] and sorted(built) == [0, 1, 2]
