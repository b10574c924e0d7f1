"""Under torchrun (one rank): the trainer's stack with its engine replaced by a stand-in that satisfies the engine
protocol (`rollout/protocols.Engine`) and knows nothing of vLLM, and one infer period run through it.

argv: hf_dir train_file templates run_dir out.json
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class StandInEngine:
    """Answers every task prompt with `n` fixed responses, alternating the boxed answers 1 and 2, every judge prompt
    with one verdict (No, or B), and records the weights it is given."""

    def __init__(self, tokenizer):
        self.tok, self.received, self.requests = tokenizer, [], 0
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def generate(self, requests, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=256, stop=None,
                 seed=None, ignore_eos=False):
        from megatron_spark.rollout.engine import Sample

        out = []
        for r in requests:
            self.requests += 1
            prompt_ids = self.tok(r.prompt)["input_ids"]
            group = []
            for k in range(n):
                judge = "Yes or No" in r.prompt or "A or B" in r.prompt  # (the templates' wording)
                text = ("\\boxed{No}" if "Yes or No" in r.prompt else "\\boxed{B}") if judge else \
                    f"\\boxed{{{1 + k % 2}}}"
                ids = self.tok(text, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [self.eos]
                group.append(Sample(text, ids, [-1.0] * len(ids), "stop", prompt_ids))
            out.append(group)
        return out

    def update_weights(self, named_tensors):
        self.received.append({name: list(t.shape) for name, t in named_tensors})

    def invalidate_caches(self):
        pass

    def inplace_targets(self):
        raise ValueError("the stand-in takes whole tensors (rollout.sync_target=hf_full)")

    def sleep(self):
        pass

    def wake_up(self, tags=None):
        pass


def main(hf: str, train: str, templates: str, run_dir: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors import safe_open

    from megatron_spark.config import load_config
    from megatron_spark.rollout.protocols import Engine, Rollouts
    from megatron_spark.recycle import recycle
    from megatron_spark.samples import Task
    from megatron_spark.train import build_stack
    from megatron_spark.trainer import SparkTrainer

    cfg = load_config(str(ROOT / "examples" / "tiny_cpu.yaml"), [
        f"model.hf_dir={hf}", f"data.train_file={train}", f"logging.dir={run_dir}", "logging.progress_bar=false",
        f"algorithm.recycle.templates_file={templates}", "parallel.tensor_model_parallel_size=1",
        "rollout.tensor_parallel_size=1", "rollout.backend=hf", "data.rollout_batch_size=4",
        "training.global_batch_size=8", "training.micro_batch_size=4", "rollout.max_new_tokens=8",
        "training.max_steps=1", "training.sft_warmup_steps=0", "algorithm.kl_coef=0",
        "algorithm.recycle.reward_batch_size=4", "algorithm.recycle.judge_cap=4", "algorithm.recycle.reflection_cap=0",
        "algorithm.recycle.counterfactual_verdicts=true"])
    stack = build_stack(cfg, 1)
    engine = StandInEngine(stack.prompts.tokenizer)
    stack.rollouts.engine = engine  # (the colocated rollouts reach their engine only through the protocol)
    trainer = SparkTrainer(cfg, stack)
    episode, batch = stack.data.next_batch()
    metrics, groups = trainer.period("infer", [Task.from_example(episode, ex) for ex in batch], 0)
    synced, requests = list(engine.received), engine.requests
    # a reward period on the judge tasks recycled from those groups: the stand-in gives each one verdict only, so
    # any gradient there comes from algorithm.recycle.counterfactual_verdicts
    trainer.queue.start_episode(episode)
    trainer.queue.push(recycle(groups, stack.templates, trainer.recycle_settings, trainer.rng))
    aux = trainer.queue.pop_batch()
    judged = trainer.period("reward", [Task.from_aux(f"j{i}", t, 3136) for i, t in enumerate(aux)], 1)[0]
    with safe_open(str(Path(hf) / "model.safetensors"), "pt") as f:
        hf_shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({
            "engine_is_an_engine": isinstance(engine, Engine), "rollouts_are_rollouts": isinstance(stack.rollouts,
                                                                                                 Rollouts),
            "requests": requests, "metrics": {k: v for k, v in metrics.items() if not k.startswith("time")},
            "responses": sorted({r for g in groups for r in g.responses}),
            "synced_once": len(synced) == 1, "synced_like_hf": synced[-1] == hf_shapes if synced else False,
            "judged": {k: v for k, v in judged.items() if not k.startswith("time")}}))
    stack.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
