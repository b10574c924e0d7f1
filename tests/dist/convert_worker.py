"""torchrun worker (4 ranks): converted checkpoints against HF at TP x PP in {1,2}^2, and a re-save at TP=2 PP=2.

Usage: torchrun --nproc-per-node 4 tests/dist/convert_worker.py CASES_JSON OUT_JSON
CASES_JSON maps a case name to {"hf": HF_DIR, "ckpt": CKPT, "resave": DIR or null}. For each case the verify
tool's library compares logits at the four layouts; with "resave", the checkpoint loaded at TP=2 PP=2 is saved
again by megatron-core itself (so its chunks are cut by that layout) for the export test to read back.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    cases = json.loads(open(sys.argv[1]).read())
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_spark.io.checkpoint_layout import load_model_weights, model_sharded_state
    from megatron_spark.io.checkpoint_layout import resolve_checkpoint
    from megatron_spark.convert.layout import META_FILE
    from megatron_spark.convert.verify import verify_checkpoint
    from megatron_spark.models.hf_config import load_hf_config
    from megatron_spark.models.build import build_model
    from megatron_spark.parallel import ParallelLayout

    results = {}
    for case, c in cases.items():
        results[case] = verify_checkpoint(c["hf"], c["ckpt"], [(1, 1), (1, 2), (2, 1), (2, 2)])
        if c.get("resave"):
            shape = load_hf_config(c["hf"])
            layout = ParallelLayout(tp=2, pp=2, world_size=dist.get_world_size())
            layout.initialize(seed=1)
            chunks = build_model(shape, layout, dtype=torch.float32)
            load_model_weights(chunks, resolve_checkpoint(c["ckpt"])[1])
            out = Path(c["resave"])
            if dist.get_rank() == 0:
                (out / "iter_0000003").mkdir(parents=True)
            dist.barrier()
            dist_checkpointing.save(model_sharded_state(chunks), str(out / "iter_0000003"))
            if dist.get_rank() == 0:
                (out / "latest_checkpointed_iteration.txt").write_text("3")
                shutil.copy(Path(c["ckpt"]) / META_FILE, out / META_FILE)
            ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
