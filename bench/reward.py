"""Reward-check throughput: RewardPool (process workers, hard timeouts) vs a plain sequential loop.

python bench/reward.py [--n 400] [--workers 2] [--timeout 2.0]
Responses are long reasoning texts (~3 KB) ending in a boxed answer; golds mix integers, fractions, decimals,
percentages, intervals, expressions and Yes/No/A/B labels; about half are correct.
"""
import argparse
import json
import random
import statistics
import time

from megatron_spark.reward import RewardPool, score

GOLDS = [("12", ["12", "12.0", "13"]), ("\\frac{3}{4}", ["0.75", "\\frac{3}{4}", "\\frac{4}{3}"]),
         ("0.25", ["25\\%", "\\frac{1}{4}", "0.2"]), ("(1,3]", ["(1, 3]", "[1,3]"]),
         ("x^2+2x+1", ["(x+1)^2", "x^2+1"]), ("\\sqrt{2}", ["\\frac{2}{\\sqrt{2}}", "2"]),
         ("Yes", ["Yes", "No", "\\text{Yes}"]), ("B", ["B", "A", "(B)"])]


def make(n: int, seed: int = 0):
    rnd = random.Random(seed)
    words = "so we compute the area then subtract the overlap and divide by the total count of shapes".split()
    out = []
    for _ in range(n):
        gold, preds = rnd.choice(GOLDS)
        body = " ".join(rnd.choice(words) for _ in range(500))
        out.append((f"Let us reason step by step. {body} Therefore the answer is \\boxed{{{rnd.choice(preds)}}}.",
                    gold))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0)
    a = ap.parse_args()
    items = make(a.n)
    resp, gold = [r for r, _ in items], [g for _, g in items]
    score(resp[0], gold[0])  # warm the in-process parser, as the pool's workers are warm after their first item
    t0 = time.perf_counter()
    seq = [score(r, g) for r, g in items]
    t_seq = time.perf_counter() - t0
    with RewardPool(workers=a.workers, timeout_s=a.timeout) as pool:
        pool.score(resp[:4], gold[:4])  # spawn + import math-verify in the workers (one-time, reported below)
        t0 = time.perf_counter()
        par = pool.score(resp, gold)
        t_pool = time.perf_counter() - t0
        assert par == seq, "pool and sequential disagree"
        bad = "\\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}"
        mixed_r, mixed_g = list(resp[:100]), list(gold[:100])
        for k in (10, 50, 90):  # three pathological items in a batch of 100
            mixed_r[k], mixed_g[k] = bad, "1"
        t0 = time.perf_counter()
        pool.score(mixed_r, mixed_g)
        t_mixed = time.perf_counter() - t0
        worst, waited = pool.stats.worst_item_s, pool.stats.replace_wait_s
    res = {"items": a.n, "correct_fraction": statistics.mean(seq), "sequential_checks_per_s": a.n / t_seq,
           "pool_checks_per_s": a.n / t_pool, "workers": a.workers,
           "batch_of_100_with_3_pathological_items_s": t_mixed, "worst_item_latency_s": worst,
           "replacement_wait_s": waited, "timeout_s": a.timeout}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
