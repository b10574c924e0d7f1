"""`megatron-spark convert hf-to-megatron | megatron-to-hf | verify`: the model I/O tools as subcommands
(tools/convert/*.py are thin wrappers over these). `verify` relaunches itself under torchrun
(`launch.relaunch_under_torchrun`); the weight-sync check lives with the bridge (bridge/cli.py)."""
from __future__ import annotations

import argparse
import itertools
import os
import sys

DOCS = {
    'hf-to-megatron': """Convert a Hugging Face Qwen2 / Qwen2.5 / Qwen2.5-VL directory into a megatron-core
torch_dist checkpoint.

    megatron-spark convert hf-to-megatron --hf-dir Qwen2.5-VL-32B-Instruct --out ckpt/spark-vl-32b [--dtype bf16]

The output is in the Megatron-LM layout (OUT/iter_0000000/, OUT/latest_checkpointed_iteration.txt) plus
OUT/megatron_spark.json (family, HF config, true and padded vocab, dtype, tool version) and OUT/hf_assets/
(tokenizer, processor, generation config). It loads at ANY TP/PP (dist-checkpointing reshards at load time).
--tp only chooses the vocabulary padding, a multiple of lcm(128, TP): every TP dividing 128 gives the same
checkpoint, so pass it only for a TP like 3 or 6. --pp is only checked against the layer count.
Streams one tensor at a time (peak memory ~ the largest tensor, never the model); writes OUT atomically.
""",
    'megatron-to-hf': """Export a megatron-core torch_dist checkpoint (converted, or written by
`megatron-spark train` at any TP/PP/VPP) to a Hugging Face directory that transformers and vLLM load as the
original model type.

    megatron-spark convert megatron-to-hf --ckpt runs/spark-vl-32b/checkpoints --out spark-vl-32b-hf [--iteration 400]

--ckpt is a checkpoint root (the latest iteration is used unless --iteration says otherwise) or one iter_*
directory. The model's HF config and tokenizer come from the checkpoint's megatron_spark.json and hf_assets/;
for a checkpoint written by another tool pass --hf-config-dir with the original HF directory. Writes sharded
safetensors with an index, config.json (dtype updated), generation config and tokenizer/processor files.
Streams one tensor at a time; writes OUT atomically.

    megatron-spark convert megatron-to-hf --ckpt runs/spark-vl-32b/checkpoints --out spark-vl-32b-fp8 \
        --quantize fp8-per-channel

--quantize FORMAT writes a modelopt-quantized checkpoint for serving instead (vLLM loads it as quant_method
"modelopt"): fp8 (per-tensor, static activation scales: needs --calib-data), fp8-per-channel, w4a16-nvfp4,
nvfp4 (needs a GPU) or int8-wo. See docs/quantization.md.
""",
    'verify': """Check a megatron checkpoint against its HF model, logit by logit.

    megatron-spark convert verify --hf-dir HF --ckpt CKPT --tp 2 --pp 1
    megatron-spark convert verify --hf-dir HF --ckpt CKPT --tp 1 2 --pp 1 2     # all four layouts, one launch

Builds the Megatron model at each TP x PP, loads CKPT through dist-checkpointing (resharding), runs text inputs
(and two image+text inputs for Qwen2.5-VL) and compares the full-vocabulary logits with HF transformers, both in
fp32. Prints max |logit difference| and argmax agreement per layout and input; exits 1 beyond --atol, 2 on bad
input. Relaunches itself under torchrun on this node (world = lcm of the TP x PP products); started by your own
torchrun/srun (e.g. across nodes) it runs in place, with a world that every TP x PP divides. For a training
checkpoint, HF is the model it started from: expect differences, use this on converted checkpoints and exports.
""",
}


def add_convert_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="convert_cmd", required=True)
    h = sub.add_parser("hf-to-megatron", help="HF directory -> torch_dist checkpoint (any TP/PP)",
                       description=DOCS["hf-to-megatron"], formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    h.add_argument("--out", required=True, help="checkpoint root to create")
    h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the HF weights' dtype")
    h.add_argument("--train-tp", "--tp", dest="tp", type=int, default=1,
                   help="only affects vocabulary padding (see above)")
    h.add_argument("--train-pp", "--pp", dest="pp", type=int, default=1,
                   help="only validated against the layer count")
    h.add_argument("--force", action="store_true", help="replace a non-empty --out")
    h.add_argument("--no-fsync", action="store_true", help="skip fsync of each file (faster, less crash-safe)")
    m = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> HF directory (optionally quantized)",
                       description=DOCS["megatron-to-hf"], formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--ckpt", required=True, help="checkpoint root or iter_* directory")
    m.add_argument("--out", required=True, help="HF directory to create")
    m.add_argument("--iteration", type=int, help="default: latest_checkpointed_iteration.txt")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the checkpoint's dtype")
    m.add_argument("--hf-config-dir", help="original HF directory (for checkpoints without megatron_spark.json)")
    m.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    m.add_argument("--force", action="store_true", help="replace a non-empty --out")
    m.add_argument("--quantize", metavar="FORMAT",
                   help="fp8 | fp8-per-channel | w4a16-nvfp4 | nvfp4 | int8-wo (nvidia-modelopt)")
    m.add_argument("--calib-data", help="Spark data file whose first prompts calibrate activation scales")
    m.add_argument("--calib-prompts", type=int, default=16, help="prompts used for calibration (default 16)")
    v = sub.add_parser("verify", help="a checkpoint's logits against its HF model at several TP x PP",
                       description=DOCS["verify"], formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--hf-dir", required=True, help="the HF model the checkpoint was converted from (or to)")
    v.add_argument("--ckpt", required=True, help="checkpoint root or iter_* directory")
    v.add_argument("--iteration", type=int, help="default: the latest complete one")
    v.add_argument("--train-tp", "--tp", dest="tp", type=int, nargs="+", default=[1],
                   help="tensor-parallel sizes to check")
    v.add_argument("--train-pp", "--pp", dest="pp", type=int, nargs="+", default=[1],
                   help="pipeline-parallel sizes to check")
    v.add_argument("--atol", type=float, default=1e-3, help="max |logit difference| allowed (fp32 compute)")


def run_convert(a) -> int:
    from megatron_spark.convert.output import run_cli

    if a.convert_cmd == "hf-to-megatron":
        from megatron_spark.convert.converters import hf_to_megatron

        return run_cli(lambda: hf_to_megatron(a.hf_dir, a.out, dtype=a.dtype, tp=a.tp, pp=a.pp, force=a.force,
                                              sync_files=not a.no_fsync))
    if a.convert_cmd == "megatron-to-hf":
        from megatron_spark.convert.converters import megatron_to_hf

        return run_cli(lambda: megatron_to_hf(a.ckpt, a.out, iteration=a.iteration, dtype=a.dtype,
                                              hf_config_dir=a.hf_config_dir, force=a.force,
                                              max_shard_bytes=int(a.max_shard_size_gb * 2 ** 30),
                                              quantize=a.quantize, calib_data=a.calib_data,
                                              calib_prompts=a.calib_prompts))
    return _verify(a)


def _verify(a) -> int:
    from megatron_spark.convert.verify import check_inputs, format_report, layouts_world, verify_checkpoint
    from megatron_spark.launch import relaunch_under_torchrun, under_torchrun, worker_exit

    layouts = list(itertools.product(a.tp, a.pp))
    if not under_torchrun():
        check_inputs(a.hf_dir, a.ckpt, layouts, a.iteration)  # (a ValueError: one line, exit 2)
        return relaunch_under_torchrun(a.argv, layouts_world(layouts))

    import torch.distributed as dist

    try:
        results = verify_checkpoint(a.hf_dir, a.ckpt, layouts, a.iteration)
    except ValueError as e:
        rank = int(os.environ["RANK"])
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return worker_exit(2, rank)
    text, ok = format_report(results, a.atol)
    if dist.get_rank() == 0:
        print(text)
        print("verify:", "OK" if ok else f"FAILED (atol {a.atol})", flush=True)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return worker_exit(0 if ok else 1, rank)
