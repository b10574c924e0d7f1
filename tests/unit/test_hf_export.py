"""The HF export's publishing step (megatron_spark/convert/hf_export.py), without a trainer: rename, `latest`,
pruning, and exports left by a run that went back to an earlier checkpoint."""
import json

import torch

from megatron_spark.convert.hf_export import _publish, step_dir


def _export_dir(root, name):
    d = root / "hf" / name
    d.mkdir(parents=True)
    (d / "model.safetensors.index.json").write_text("{}")
    return d


def test_latest_follows_the_run_after_it_went_back(tmp_path):
    hf = tmp_path / "model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "float32"}))
    (hf / "tokenizer.json").write_text("{}")
    root = tmp_path / "ckpt"
    for step in (80, 90):  # a run that went on to step 90, then crashed without a checkpoint after step 50
        _export_dir(root, f"step_{step:07d}")
    final = step_dir(root, 60)
    tmp = _export_dir(root, ".step_0000060.tmp")
    _publish(tmp, final, [[("model-00001-of-00001.safetensors", [])]], str(hf), torch.bfloat16, keep_last=2)
    assert sorted(p.name for p in (root / "hf").iterdir()) == ["latest", "step_0000060"]
    assert (root / "hf" / "latest").resolve() == final.resolve()
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (final / "tokenizer.json").is_file()
    # the same step again (a resume past it): replaced, and older ones pruned to keep_last
    _export_dir(root, "step_0000070")
    again = _export_dir(root, ".step_0000070.tmp")
    (again / "marker").write_text("new")
    _publish(again, step_dir(root, 70), [[("model-00001-of-00001.safetensors", [])]], str(hf), torch.bfloat16,
             keep_last=1)
    assert sorted(p.name for p in (root / "hf").iterdir()) == ["latest", "step_0000070"]
    assert (root / "hf" / "step_0000070" / "marker").read_text() == "new"
