"""`megatron-spark eval` and `megatron-spark score`.

    megatron-spark eval BENCH.json --model HF_DIR|MEGATRON_CKPT --out DIR [--mode plain|tts] [--engines N]
    megatron-spark eval BENCH.json --server http://127.0.0.1:8000 --model NAME --out DIR
    megatron-spark score DIR|RELEASED_RESULTS.json [...] [--spark-compat] [--plot out.png]

Everything is checked before an engine starts: the items (fields, images), the settings against the results
directory, the model path. Results go to DIR/results*.jsonl as items finish; DIR/metrics.json, DIR/table.md and
DIR/accuracy.png at the end. Rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_spark.evaluation.items import FORMATS, EvalInputError, load_items
from megatron_spark.evaluation.protocol import (PAPER_VOTE_TEMPERATURE, PROTOCOL_FILE, PROTOCOLS,
                                                TRAINED_JUDGE_VOTES, TrainedPrompts)
from megatron_spark.evaluation.settings import MODES, EvalSettings, GenerationSettings


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="benchmark file: Spark JSON list / JSONL, VL-RewardBench, RewardBench 2 or judge")
    p.add_argument("--model", required=True, help="HF directory or Megatron checkpoint (root or iter_*); with "
                                                  "--server, the served model's name")
    p.add_argument("--out", required=True, help="results directory (resumed when it holds the same settings)")
    p.add_argument("--format", choices=FORMATS, help="default: detected from the first item")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the file's)")
    p.add_argument("--mode", choices=MODES, default="plain", help="tts: answer, self-judge, reflect")
    p.add_argument("--tts-rounds", type=int, default=2, help="tts: self-judge / reflect rounds per item")
    p.add_argument("--limit", type=int, help="only the first N items")
    srv = p.add_argument_group("backend")
    srv.add_argument("--server", help="URL of an OpenAI-compatible server (e.g. vllm serve); default: vLLM here")
    srv.add_argument("--send-processor-kwargs", action="store_true",
                     help="send the image bounds with each request (server started with --trust-request-mm-kwargs)")
    srv.add_argument("--concurrency", type=int, default=16, help="--server: requests in flight at once")
    srv.add_argument("--retries", type=int, default=3,
                     help="--server: attempts per request (backoff between); what still fails is an error item")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    srv.add_argument("--tensor-parallel-size", "--rollout-tp", type=int, default=1,
                     help="vLLM tensor-parallel size of each engine (as rollout.tensor_parallel_size in training)")
    srv.add_argument("--engines", type=int, default=1, help="data-parallel vLLM engines, one process each")
    srv.add_argument("--max-model-len", type=int, help="vLLM context length (default: the model's)")
    srv.add_argument("--iteration", type=int, help="Megatron checkpoint iteration (default: latest)")
    srv.add_argument("--hf-config-dir", help="HF directory of a Megatron checkpoint written by another tool")
    srv.add_argument("--chunk-size", type=int, default=32, help="items per results flush")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="how prompts are built and sampled: 'trained' = as the training run did (read from the "
                        "model's prompt_protocol.json; the default when it has one), 'paper' = the released SPARK "
                        "evaluation scripts' settings (the default otherwise); the flags below override fields")
    p.add_argument("--protocol-file", help="a prompt_protocol.json for --protocol trained when the model has none "
                                           "beside it (e.g. with --server)")
    gen = p.add_argument_group("generation (default: the protocol's)")
    d = GenerationSettings()
    gen.add_argument("--system-prompt", help=f"system message of every conversation ('' for none; paper: "
                                             f"'{d.system_prompt}')")
    gen.add_argument("--suffix", help="appended to each math problem ('' for none)")
    gen.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass")
    gen.add_argument("--max-tokens", type=int, help=f"new tokens per answer at most (paper: {d.max_tokens})")
    gen.add_argument("--repetition-penalty", type=float,
                     help=f"vLLM's repetition penalty (1: none; paper: {d.repetition_penalty})")
    gen.add_argument("--min-pixels", type=int, help="image resize lower bound (processor)")
    gen.add_argument("--max-pixels", type=int, help="image resize upper bound (processor)")
    gen.add_argument("--seed", type=int, default=d.seed,
                     help="sampling seed (each request's own: from it and the request's content)")
    gen.add_argument("--chat-template-kwargs", type=_json_mapping,
                     help="keyword arguments of the model's chat template as JSON, e.g. "
                          "'{\"enable_thinking\": false}' (Qwen3 without its thinking mode; trained: the run's "
                          "data.chat_template_kwargs)")
    rew = p.add_argument_group("judging")
    rew.add_argument("--votes", type=int, help=f"samples per judge item (k; default 1, judge tasks under the "
                                               f"trained protocol {TRAINED_JUDGE_VOTES}: AUROC, vote accuracy)")
    rew.add_argument("--vote-temperature", type=float,
                     help=f"temperature of the k votes (paper: {PAPER_VOTE_TEMPERATURE}; trained: the run's)")
    rew.add_argument("--swap-seed", type=int, default=1234, help="seed of the answer order / slot")
    rew.add_argument("--templates", help="judge / reflection template file (YAML or JSON; trained: the run's)")
    rew.add_argument("--judge-prompt", help="a reward benchmark's prompt from a file (e.g. the official one)")
    p.add_argument("--spark-compat", action="store_true", help="lead the report with the released scripts' scorer")
    p.add_argument("--score-timeout", type=float, default=10.0, help="seconds per answer check")
    p.add_argument("--force", action="store_true", help="discard results of other settings in --out")
    p.add_argument("--verbose", action="store_true", help="vLLM's and transformers' info logs")
    p.add_argument("--num-nodes", type=int, default=1,
                   help="nodes sharing this evaluation (slurm/eval.sbatch sets it): each runs its part (--node-rank) "
                        "with the same --engines and writes no report; a last run without these flags reports")
    p.add_argument("--node-rank", type=int, default=0, help="this node's part, 0 .. --num-nodes - 1")
    p.add_argument("--shard", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-shards", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model-id", help=argparse.SUPPRESS)


def add_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="results directories of `eval`, or results JSON of the released scripts")
    p.add_argument("--spark-compat", action="store_true", help="lead the report with the released scripts' scorer")
    p.add_argument("--plot", help="PNG bar chart of all given runs side by side")


def _check_file(flag: str, path: Optional[str]) -> None:
    if path is not None and not Path(path).is_file():
        raise EvalInputError(f"{flag} '{path}' does not exist")


def _model_kind(path: str) -> str:
    p = Path(path)
    if (p / "config.json").is_file():
        return "hf"
    from megatron_spark.io.checkpoint_layout import is_megatron_checkpoint

    if is_megatron_checkpoint(p):
        return "megatron"
    raise EvalInputError(f"--model '{path}' is neither a HF directory (config.json) nor a Megatron checkpoint "
                         f"(latest_checkpointed_iteration.txt or an iter_* directory); with --server give the served "
                         f"model's name")


_GENERATION_FLAGS = ("system_prompt", "suffix", "temperature", "top_p", "max_tokens", "repetition_penalty",
                     "min_pixels", "max_pixels", "chat_template_kwargs")


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); e.g. '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def resolve_protocol(args, kind: str) -> tuple[str, Optional[TrainedPrompts]]:
    """The protocol's name and, for `trained`, the run's prompt settings: from --protocol-file, else beside the
    model (a Megatron checkpoint's root, an HF export); `trained` is the default when the model has them."""
    if args.protocol_file:
        if not Path(args.protocol_file).is_file():
            raise EvalInputError(f"--protocol-file '{args.protocol_file}' does not exist")
        trained = TrainedPrompts(**json.loads(Path(args.protocol_file).read_text()))
    else:
        trained = TrainedPrompts.read(args.model) if kind != "server" else None
    name = args.protocol or ("trained" if trained is not None else "paper")
    if name == "trained" and trained is None:
        raise EvalInputError(f"--protocol trained: '{args.model}' has no {PROTOCOL_FILE} (a training run writes it "
                             f"into its checkpoint directory and HF exports); give --protocol-file, or use "
                             f"--protocol paper")
    return name, trained if name == "trained" else None


def settings_from(args, fmt: str, model_id: str, protocol: str = "paper",
                  trained: Optional[TrainedPrompts] = None) -> EvalSettings:
    """The protocol's settings with the explicit flags on top."""
    base = trained.generation(args.seed, judge=fmt == "judge") if trained is not None else \
        GenerationSettings(seed=args.seed)
    given = {f: getattr(args, f) for f in _GENERATION_FLAGS if getattr(args, f, None) is not None}
    if "system_prompt" in given and given["system_prompt"] == "":
        given["system_prompt"] = None
    gen = dataclasses.replace(base, **given)
    votes = args.votes if args.votes is not None else (
        TRAINED_JUDGE_VOTES if trained is not None and fmt == "judge" else 1)
    vote_t = args.vote_temperature if args.vote_temperature is not None else (
        trained.temperature if trained is not None else PAPER_VOTE_TEMPERATURE)
    read = lambda p: Path(p).read_text() if p else None  # noqa: E731 - settings hash the texts, not the paths
    templates = read(args.templates) if args.templates else (trained.templates if trained is not None else None)
    name = protocol + (f" (changed: {', '.join(sorted(given))})" if given else "")
    return EvalSettings(model_id, fmt, name, args.mode, args.tts_rounds, votes, vote_t, args.swap_seed, templates,
                        read(args.judge_prompt), gen).validate()


def _export(ckpt: str, args, out: Path, node: int = 0) -> str:
    from megatron_spark.convert.converters import megatron_to_hf

    target = out / f".model-export-{node}"  # one per node of a multi-node evaluation (they share --out)
    shutil.rmtree(target, ignore_errors=True)
    print(f"exporting Megatron checkpoint {ckpt} to a temporary HF directory ...", file=sys.stderr, flush=True)
    megatron_to_hf(ckpt, target, iteration=args.iteration, hf_config_dir=args.hf_config_dir)
    return str(target)


def _quiet(verbose: bool) -> None:
    from megatron_spark.logs import quiet_libraries

    quiet_libraries(verbose)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)


def _bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="item", dynamic_ncols=True, file=sys.stderr,
                disable=None)


def run_eval(args) -> int:
    from megatron_spark.evaluation import runner
    from megatron_spark.evaluation.report import markdown, write_reports

    _quiet(args.verbose)
    # SIGTERM (preemption, slurm/eval.sbatch stopping us) unwinds like an exception, so the engine processes of
    # --engines, the scoring workers and the temporary export are cleaned up; finished items are already on disk.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fmt, items = load_items(args.file, args.format, args.image_root, limit=args.limit)
    for flag in ("templates", "judge_prompt"):
        _check_file("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.engines < 1 or args.tensor_parallel_size < 1:
        raise EvalInputError("--engines and --tensor-parallel-size must be >= 1")
    node_part = args.num_nodes > 1
    if args.num_nodes < 1 or not 0 <= args.node_rank < args.num_nodes:
        raise EvalInputError(f"--node-rank {args.node_rank} of --num-nodes {args.num_nodes}: the rank must be in "
                             f"0 .. {args.num_nodes - 1}")
    if node_part and args.force:
        raise EvalInputError("--force with --num-nodes: every node would discard the others' results; clear --out "
                             "(or run once with --force and --limit 0) before a multi-node evaluation")
    if node_part and args.shard is None and (args.engines == 1 or args.server):
        # one engine per node: this node is one shard of num_nodes (several engines: _run_shards splits further)
        args.shard, args.num_shards = args.node_rank, args.num_nodes
    kind = "server" if args.server else _model_kind(args.model)
    if args.model_id:
        model_id = args.model_id
    elif kind == "server":
        model_id = f"served:{args.model}"
    else:
        model_id = str(Path(args.model).resolve()) + (f"@{args.iteration}" if args.iteration is not None else "")
    protocol, trained = resolve_protocol(args, kind)
    settings = settings_from(args, fmt, model_id, protocol, trained)
    out = Path(args.out)
    store = runner.ResultStore(out, settings, args.shard, args.force)
    ids = {it.id for it in items}
    done = len(store.done() & ids)
    todo = len(items) - done
    if args.shard is None:
        print(f"{args.file}: {len(items)} items ({fmt}, {settings.mode}, protocol {settings.protocol}), {done} "
              f"already in {out}; settings {settings.hash}", file=sys.stderr, flush=True)
    export_dir = None
    t0 = time.time()
    if todo:
        hf_dir = args.model
        if kind == "megatron":
            hf_dir = export_dir = _export(args.model, args, out, args.node_rank)
        try:
            if args.engines > 1 and kind != "server" and args.shard is None:
                _run_shards(args, hf_dir, model_id, store, ids, len(items), done)
            else:
                _run_here(args, kind, hf_dir, fmt, settings, store, items, done)
        finally:
            if export_dir:
                shutil.rmtree(export_dir, ignore_errors=True)
    if args.shard is not None or node_part:
        return 0  # a shard or a node's part: whoever started it reports
    records = [r for i, r in store.records().items() if i in ids]
    m = write_reports(out, fmt, records, settings.mode, args.spark_compat,
                      {"items": len(items), "seconds": round(time.time() - t0, 1), "settings_hash": settings.hash,
                       "protocol": settings.protocol})
    print(markdown(fmt, m, args.spark_compat))
    print(f"results: {out}/results*.jsonl, {out}/metrics.json, {out}/table.md, {out}/accuracy.png")
    return 0


def _run_here(args, kind, hf_dir, fmt, settings, store, items, done) -> None:
    from megatron_spark.evaluation import runner
    from megatron_spark.evaluation.backends import ServerBackend, VLLMBackend, server_flags

    if kind == "server":
        backend = ServerBackend(args.server, args.model, args.concurrency, args.retries, args.request_timeout,
                                send_processor_kwargs=args.send_processor_kwargs)
        if not args.send_processor_kwargs:
            print(f"server backend: images are sized by the server; start it with "
                  f"{server_flags(settings.generation)} to match these settings", file=sys.stderr)
    else:
        backend = VLLMBackend(hf_dir, args.tensor_parallel_size, args.max_model_len, args.seed,
                              as_trained=settings.protocol.startswith("trained"))
    pool = runner.scoring_pool(fmt, timeout_s=args.score_timeout)
    evaluator = runner.Evaluator(fmt, settings, backend, pool)
    mine = runner.pending_items(items, store.done(), args.shard or 0, args.num_shards)
    bar = _bar(len(mine), 0) if args.shard is None else None
    try:
        runner.run(items, evaluator, store, args.chunk_size, args.shard or 0, args.num_shards,
                   on_chunk=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
        if pool:
            pool.close()
        backend.close()


def _run_shards(args, hf_dir: str, model_id: str, store, ids: set, total: int, done: int) -> None:
    """One child process per engine, each on its share of the pending items and its own GPUs; this process
    shows one progress bar and takes the children down with it."""
    import torch

    argv = list(args.argv)
    # a node's part of a multi-node evaluation takes shards node_rank * engines ... of num_nodes * engines
    first, num_shards = args.node_rank * args.engines, args.num_nodes * args.engines
    base = [sys.executable, "-m", "megatron_spark.cli"] + _replace_model(argv, hf_dir) + \
        ["--model-id", model_id, "--num-shards", str(num_shards)]
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    procs = []
    try:
        for i in range(args.engines):
            env = dict(os.environ)
            if torch.cuda.is_available():
                tp = args.tensor_parallel_size
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * tp:(i + 1) * tp])
            procs.append(subprocess.Popen(base + ["--shard", str(first + i)], env=env))
        bar = _bar(total, done)
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            bar.update(len(store.done() & ids) - bar.n)
        bar.update(len(store.done() & ids) - bar.n)
        bar.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [i for i, p in enumerate(procs) if p.returncode]
    if bad:
        raise RuntimeError(f"evaluation engine(s) {bad} failed; rerun the same command to resume")


def _replace_model(argv: list[str], hf_dir: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            out.append(hf_dir)
            skip = False
        elif a == "--model":
            out.append(a)
            skip = True
        elif a.startswith("--model="):
            out.append(f"--model={hf_dir}")
        else:
            out.append(a)
    return out


def run_score(args) -> int:
    from megatron_spark.evaluation.report import bar_chart, headline, markdown, metrics, rescore_released

    charts = {}
    for path in args.paths:
        p = Path(path)
        if p.is_dir():
            sfile = p / "settings.json"
            if not sfile.is_file():
                raise EvalInputError(f"'{p}' is not a results directory of `megatron-spark eval` (no settings.json)")
            s = json.loads(sfile.read_text())
            latest = {}
            for f in sorted(p.glob("results*.jsonl")):
                for line in f.read_text().splitlines():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a killed run
                    if r.get("settings") == s["hash"]:
                        latest[r["id"]] = r
            fmt, mode = s["settings"]["format"], s["settings"]["mode"]
            m = metrics(fmt, latest.values(), mode)
        elif p.is_file():
            fmt, mode = "spark", "plain"
            m = metrics(fmt, rescore_released(p))
        else:
            raise EvalInputError(f"'{p}' does not exist")
        print(f"## {p}\n")
        print(markdown(fmt, m, args.spark_compat))
        charts[p.name or str(p)] = headline(fmt, m, args.spark_compat)
    if args.plot:
        print(f"plot: {bar_chart(charts, args.plot)}")
    return 0
