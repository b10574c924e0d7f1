"""The converters on bad input: every case is a ValueError naming the file or field, and nothing is left behind."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_spark.convert.converters import hf_to_megatron, megatron_to_hf
from megatron_spark.io.safetensors import HFCheckpoint, ShardedSafetensorsWriter, TensorSpec

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def hf(tiny_models, tmp_path):
    """A private copy of the tied tiny Qwen2 with its weights split over two shards and an index."""
    src = Path(tiny_models["q2_tied"])
    d = tmp_path / "hf"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    ck = HFCheckpoint(src)
    names = ck.keys()
    w = ShardedSafetensorsWriter(d, [TensorSpec(n, ck.shape(n), ck.dtype(n)) for n in names],
                                 max_shard_bytes=sum(TensorSpec(n, ck.shape(n), ck.dtype(n)).nbytes
                                                     for n in names) // 2)
    for n in names:
        w.write(n, ck.get(n))
    w.close()
    assert len(w.files) >= 2
    return d


def _shards(d):
    return sorted(d.glob("model-*.safetensors"))


def _no_leftovers(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_streamed_shards_read_back_identically(hf, tiny_models):
    a, b = HFCheckpoint(tiny_models["q2_tied"]), HFCheckpoint(hf)
    assert sorted(a.keys()) == sorted(b.keys())
    for n in a.keys():
        assert torch.equal(a.get(n), b.get(n)), n
        rows = a.shape(n)[0]
        assert torch.equal(a.read_rows(n, 0, rows // 3, rows // 2), b.get(n)[rows // 3: rows // 3 + rows // 2])
    # transformers reads our shards and index too
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(hf))


def test_truncated_shard(hf, tmp_path):
    f = _shards(hf)[1]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"'{f}' is truncated"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_corrupt_header(hf, tmp_path):
    f = _shards(hf)[0]
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"not json!!!!"
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"'{f}' is not a readable safetensors file"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_missing_shard(hf, tmp_path):
    f = _shards(hf)[1]
    f.unlink()
    with pytest.raises(ValueError, match=rf"shard '{f}' is named in the index but missing"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_unsupported_architecture(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture \['LlamaForCausalLM'\]"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_shape_disagrees_with_config(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape .* but config"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def _edit_weights(hf, edit) -> None:
    """Rewrite the checkpoint's shards with `edit(tensors)` applied."""
    ck = HFCheckpoint(hf)
    tensors = {n: ck.get(n).clone() for n in ck.keys()}
    edit(tensors)
    for f in _shards(hf) + [hf / "model.safetensors.index.json"]:
        f.unlink()
    w = ShardedSafetensorsWriter(hf, [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()


def test_fp16_overflow_is_refused_and_leaves_nothing(hf, tmp_path):
    def big(t):
        t["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    _edit_weights(hf, big)
    with pytest.raises(ValueError, match=r"--dtype fp16: tensor 'decoder.layers.1.mlp.linear_fc2.weight' has "
                                         r"values beyond fp16's range .* use --dtype bf16 or fp32"):
        hf_to_megatron(hf, tmp_path / "out", dtype="fp16")
    _no_leftovers(tmp_path / "out")


def test_quantized_weights_are_refused(hf, tmp_path):
    def quantize(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    _edit_weights(hf, quantize)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' is torch.int8; only "
                                         r"unquantized"):
        hf_to_megatron(hf, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_non_empty_output_needs_force(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=rf"--out '{out}' is not empty; .* --force"):
        hf_to_megatron(hf, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_missing_parent_directories_are_created(hf, tmp_path):
    """`--out A/B` with no A: created, as HF's save_pretrained and Megatron-LM do (both directions)."""
    from megatron_spark.convert.converters import megatron_to_hf

    ckpt = tmp_path / "new" / "deeper" / "ckpt"
    hf_to_megatron(hf, ckpt)
    assert (ckpt / "latest_checkpointed_iteration.txt").is_file()
    back = tmp_path / "other" / "hf"
    megatron_to_hf(ckpt, back)
    assert (back / "config.json").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        hf_to_megatron(hf, blocker / "out")


def test_bad_layout_arguments(hf, tmp_path):
    with pytest.raises(ValueError, match=r"--pp 3 exceeds the model's 2 layers"):
        hf_to_megatron(hf, tmp_path / "out", pp=3)
    with pytest.raises(ValueError, match=r"--tp 3: the model has 2 KV heads"):
        hf_to_megatron(hf, tmp_path / "out", tp=3)
    _no_leftovers(tmp_path / "out")


def test_vision_heads_must_divide_tp(tiny_models, tmp_path):
    cfg = json.loads((Path(tiny_models["vl_tied"]) / "config.json").read_text())
    cfg["vision_config"]["num_heads"] = 1   # layout checks run before any weight is read
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"--tp 2 does not divide the vision tower's 1 heads"):
        hf_to_megatron(tmp_path / "hf", tmp_path / "out", tp=2)


@pytest.fixture()
def megatron_ckpt(hf, tmp_path):
    """A converted torch_dist checkpoint (root with tracker, iter_0000000, megatron_spark.json)."""
    return hf_to_megatron(hf, tmp_path / "mg").out


def test_export_of_a_truncated_distcp_file_fails_and_leaves_nothing(megatron_ckpt, tmp_path):
    f = max((megatron_ckpt / "iter_0000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ValueError, match=rf"'{f}' is truncated: '.*' needs bytes up to \d+, the file has \d+"):
        megatron_to_hf(megatron_ckpt, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_export_of_a_missing_iteration_names_the_available_ones(megatron_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--iteration 7: '.*iter_0000007' does not exist; available: "
                                         r"\['iter_0000000'\]"):
        megatron_to_hf(megatron_ckpt, tmp_path / "out", iteration=7)
    _no_leftovers(tmp_path / "out")


def test_export_without_model_metadata_asks_for_the_hf_config(megatron_ckpt, hf, tmp_path):
    (megatron_ckpt / "megatron_spark.json").unlink()
    with pytest.raises(ValueError, match=r"megatron_spark.json' not found: .* pass --hf-config-dir"):
        megatron_to_hf(megatron_ckpt, tmp_path / "out")
    _no_leftovers(tmp_path / "out")
    assert megatron_to_hf(megatron_ckpt, tmp_path / "out", hf_config_dir=hf).out.is_dir()  # the fix works


def test_export_of_an_interrupted_save_is_refused(megatron_ckpt, tmp_path):
    """A save killed before torch_dist wrote its .metadata: the iteration directory is not a checkpoint."""
    (megatron_ckpt / "iter_0000000" / ".metadata").unlink()
    with pytest.raises(ValueError, match=r"\.metadata' is missing: .* is not a complete megatron torch_dist "
                                         r"checkpoint"):
        megatron_to_hf(megatron_ckpt, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--ckpt '.*' is not a directory"):
        megatron_to_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no latest_checkpointed_iteration.txt and no .metadata"):
        megatron_to_hf(tmp_path / "empty", tmp_path / "out")


def test_cli_prints_the_error_without_a_traceback(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tools/convert/hf_to_megatron.py"), "--hf-dir",
                        str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: '{tmp_path / 'config.json'}' not found")
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args,message", [
    (["--train-pp", "5"], "error: --train-pp 5 exceeds the model's 2 layers"),
    (["--train-tp", "3"], "error: --train-tp 3: the model has 2 KV heads; TP must divide them"),
    (["--rollout-tp", "3"], "error: --rollout-tp 3: vLLM needs a TP that divides the model's 2 KV heads"),
])
def test_verify_sync_refuses_a_layout_the_model_cannot_take(tiny_models, args, message):
    """One line naming the flag, exit 2, before any process starts (no megatron-core AssertionError per rank)."""
    p = subprocess.run([sys.executable, str(ROOT / "tools/verify_sync.py"), "--hf-dir", tiny_models["q2_tied"], *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip().splitlines()[-1]]
    assert p.stderr.strip().startswith(message) and "Traceback" not in p.stderr
