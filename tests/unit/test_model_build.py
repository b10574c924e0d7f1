"""How the models are built: every module on the device it runs on, config fields that take effect (recompute,
transformer_impl), and the local spec's final norm. One process (TP = PP = 1, gloo), tiny shapes."""
import ast
from pathlib import Path

import pytest
import torch

from megatron_spark.models.hf_config import parse_hf_config

pytestmark = pytest.mark.slow  # (tests/README.md: subprocesses, process groups or megatron-core models)

ROOT = Path(__file__).resolve().parents[2]
TEXT = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "tie_word_embeddings": False}
VL = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 250, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 257, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
      "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
      "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                        "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                        "window_size": 56, "fullatt_block_indexes": [1], "hidden_act": "silu"}}


@pytest.fixture(scope="module")
def megatron():
    from megatron_spark.convert.layout import single_process_parallel

    with single_process_parallel():
        yield


def _layout():
    from megatron_spark.parallel import ParallelLayout

    return ParallelLayout(world_size=1)


@pytest.mark.parametrize("config", [TEXT, {**TEXT, "tie_word_embeddings": True}, VL], ids=["text", "tied", "vl"])
def test_every_parameter_and_buffer_is_on_the_requested_device(megatron, config):
    """megatron-core moves parameters to the GPU only for DDP with the distributed optimizer; a frozen reference
    model or a verify tool keeps whatever it was built with. build_model places everything: checked on 'meta',
    a device other than the one the modules are created on (the patch embedding and torch norms are made on the
    CPU), so a module that escaped placement shows here as it would show as a CPU tensor on a GPU."""
    from megatron_spark.models.build import build_model

    chunks = build_model(parse_hf_config(config), _layout(), dtype=torch.float32, device="meta")
    tensors = [(n, t) for c in chunks for n, t in list(c.named_parameters()) + list(c.named_buffers())]
    assert len(tensors) > 10
    assert [n for n, t in tensors if t.device.type != "meta"] == []


def test_default_device_is_where_the_process_runs():
    from megatron_spark.models.build import default_device

    want = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert default_device() == want


def test_every_model_builder_places_its_chunks():
    """The trainer, the converters and the verify tools build models only through build_model (which asks the
    family for each stage and places every chunk); nothing else in the package builds a GPTModel or a vision tower
    on its own (the model modules and the family modules that bind them are the builders)."""
    offenders = []
    for path in (ROOT / "megatron_spark").rglob("*.py"):
        if (path.name == "qwen.py" and path.parent.name == "models") or path.parent.name == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "GPTModel", "Qwen25VLModel", "Qwen25VisionModel", "build_gpt"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def inside_vision(chunk, module) -> bool:
    vision = getattr(chunk, "vision_model", None)
    return vision is not None and any(module is m for m in vision.modules())


def _saved_bytes(chunks, batch, vocab):
    """Bytes autograd saves for the backward during one training forward: in total, and inside the decoder
    blocks (the transformer layers plus the final norm); plus the loss, for the gradient check."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_spark.models.runtime import call_model, gather_vocab

    from megatron_spark.models.qwen import Qwen25VisionModel

    inside = [None]
    counts = {"total": 0, "decoder": 0, "vision": 0}

    def pack(t):
        n = t.numel() * t.element_size()
        counts["total"] += n
        if inside[0]:
            counts[inside[0]] += n
        return t

    hooks = []
    for m in chunks[0].modules():
        if isinstance(m, Qwen25VisionModel):
            kind = "vision"
        elif isinstance(m, TransformerBlock) and not inside_vision(chunks[0], m):
            kind = "decoder"
        else:
            continue
        hooks.append(m.register_forward_pre_hook(lambda *_, k=kind: inside.__setitem__(0, k)))
        hooks.append(m.register_forward_hook(lambda *_: inside.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = gather_vocab(call_model(chunks[0], batch).float(), vocab)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1))
    for h in hooks:
        h.remove()
    return counts, loss


def _norm_bytes(chunk, s, b, h) -> int:
    """What the decoder's final norm alone saves for an [s, b, h] input (it is not recomputed)."""
    lm = getattr(chunk, "language_model", chunk)
    x = torch.randn(s, b, h, requires_grad=True)
    n = [0]

    def pack(t):
        n[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.decoder.final_layernorm(x)
    return n[0]


@pytest.mark.parametrize("family", ["text", "vl"])
def test_recompute_saves_less_and_changes_nothing(megatron, family):
    """model.recompute_activations: full keeps each layer's input (plus the mask and rotary table it is called
    with) instead of its activations, selective drops the attention scores; the gradients stay the same within
    fp32 round-off. (Each mode builds the same weights: the model is built on the CPU from the same seed.)"""
    from megatron_spark.models.build import build_model
    from megatron_spark.models.runtime import make_batch

    shape = parse_hf_config(TEXT if family == "text" else VL)
    b, s, h = 2, 24, shape.text.hidden_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 240, (b, s), generator=g)
    pix = grid = None
    if family == "vl":  # one 4 x 4-patch image (4 tokens) in each sequence
        ids[:, 2:6] = shape.image_token_id
        grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
        pix = torch.randn(32, 3 * 2 * 14 * 14, generator=g)
    labels = torch.roll(ids, -1, dims=1)
    batch = make_batch(shape, ids, pix, grid, labels=labels)
    results = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(0)
        chunks = build_model(shape, _layout(), dtype=torch.float32, recompute=mode)
        with torch.no_grad():  # the same weights in every mode (the builder leaves them at zero)
            gen = torch.Generator().manual_seed(1)
            for p in chunks[0].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        chunks[0].train()
        counts, loss = _saved_bytes(chunks, batch, shape.text.vocab_size)
        loss.backward()
        results[mode] = (counts, loss.item(), {n: p.grad.clone() for n, p in chunks[0].named_parameters()},
                         _norm_bytes(chunks[0], s, b, h))
    none, sel, full = (results[k][0] for k in ("none", "selective", "full"))
    layers = shape.text.num_layers
    # full: per layer the checkpoint keeps exactly its tensor inputs: hidden [s, b, h] fp32, the bool mask
    # [b, 1, s, s] and the rotary table, [s, 1, 1, head_dim] fp32 ([s, b, 1, head_dim] with mrope's per-sequence
    # positions); the final norm is not recomputed
    rope = s * (b if family == "vl" else 1) * shape.text.head_dim * 4
    per_layer_inputs = s * b * h * 4 + b * s * s + rope
    assert full["decoder"] == layers * per_layer_inputs + results["full"][3], (full, per_layer_inputs)
    assert none["decoder"] > 4 * full["decoder"], (none, full)
    # selective: the attention probabilities [b, heads, s, s] fp32 (and their dropout mask) are no longer kept
    heads = shape.text.num_heads
    assert none["decoder"] - sel["decoder"] >= layers * b * heads * s * s * 4, (none, sel)
    # the saving is all in the layers: the language model's, and the vision tower's (recomputed block by block)
    assert none["total"] - full["total"] == none["decoder"] - full["decoder"] + none["vision"] - full["vision"]
    assert (none["vision"] > 2 * full["vision"]) == (family == "vl")
    ref_loss, ref_grads = results["none"][1], results["none"][2]
    for mode in ("selective", "full"):
        assert abs(results[mode][1] - ref_loss) < 1e-6
        worst = max((results[mode][2][n] - g_).abs().max().item() / max(g_.abs().max().item(), 1e-12)
                    for n, g_ in ref_grads.items())
        assert worst < 1e-5, (mode, worst)


def test_transformer_impl_is_honoured(megatron, monkeypatch):
    """local: the local spec; transformer_engine without TE: an error with TE's import error and the fix; auto
    without TE: the local spec (on CPU without a warning: TE never runs there)."""
    from megatron_spark import compat
    from megatron_spark.models import build as qwen

    assert qwen.use_transformer_engine("local") is False
    with pytest.raises(ValueError, match=r"model.transformer_impl.*does not import \(no CUDA device"):
        qwen.use_transformer_engine("transformer_engine")
    assert qwen.use_transformer_engine("auto") is False
    monkeypatch.setattr(compat, "transformer_engine_error", lambda: None)
    assert qwen.use_transformer_engine("auto") is True and qwen.use_transformer_engine("transformer_engine")
    assert qwen.use_transformer_engine("local") is False


def test_the_local_spec_final_norm_is_torch_rmsnorm_even_with_apex(megatron, monkeypatch):
    """megatron-core picks Apex's FusedLayerNorm for a block's final norm when TE is missing and Apex is present,
    which asserts on RMSNorm; the local spec gets a torch RMSNorm however the node is set up."""
    from megatron.core.transformer import transformer_block

    from megatron_spark.models.build import build_model

    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("RMSNorm is not supported in FusedLayerNorm")

    monkeypatch.setattr(transformer_block, "LayerNormImpl", Boom)  # what an Apex-but-no-TE node would pick
    (chunk,) = build_model(parse_hf_config(TEXT), _layout(), dtype=torch.float32, use_te=False)
    assert isinstance(chunk.decoder.final_layernorm, torch.nn.RMSNorm)


def _trained(freeze: list[str]):
    """A tiny VL policy (random weights, fixed seed) after two SFT updates with `model.freeze`; returns the weights
    before and after, and the live optimizer's and DDP's bytes."""
    from megatron_spark.config import TrainingConfig
    from megatron_spark.models.freeze import freeze_parameters
    from megatron_spark.models.build import build_model
    from megatron_spark.models.weights import megatron_named_params
    from megatron_spark.loss import SFTLoss
    from megatron_spark.policy import Policy, Rollout

    shape = parse_hf_config(VL)
    chunks = build_model(shape, _layout(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    before = {n: p.detach().clone() for n, p in megatron_named_params(chunks[0])}
    freeze_parameters(chunks, freeze, multimodal=True)
    policy = Policy.for_training(chunks, shape, dtype=torch.float32, pad_id=0, total_steps=10,
                                 training=TrainingConfig(lr=1e-2, warmup_ratio=0.0, micro_batch_size=2,
                                                         use_distributed_optimizer=False))
    ids = [3, 4, shape.image_token_id, shape.image_token_id, shape.image_token_id, shape.image_token_id, 5]
    rollouts = [Rollout(ids, [7, 8, 9], "g", torch.randn(16, 3 * 2 * 14 * 14, generator=gen),
                        torch.tensor([[1, 4, 4]])) for _ in range(2)]
    for _ in range(2):
        policy.train_step(rollouts, SFTLoss())
    after = {n: p.detach().clone() for n, p in megatron_named_params(policy.modules[0])}
    opt = policy.optimizer
    states = [st for o in getattr(opt, "chained_optimizers", [opt]) for st in o.optimizer.state.values()]
    opt_bytes = sum(t.numel() * t.element_size() for st in states for k, t in st.items()
                    if k in ("exp_avg", "exp_avg_sq"))
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for c in policy.chunks for b in c.buffers)
    return before, after, opt_bytes, grad_bytes


def test_frozen_parts_stay_bit_identical_and_cost_no_optimizer_state(megatron):
    """model.freeze=[vision]: the vision tower (not its merger) is bit-identical after two updates while every other
    parameter moves; the live optimizer's Adam moments and DDP's gradient buffers shrink by exactly the frozen
    elements' fp32 bytes (2 moments and 1 gradient each)."""
    from megatron_spark.models.freeze import frozen

    b0, a0, opt0, grad0 = _trained([])
    b1, a1, opt1, grad1 = _trained(["vision"])
    frozen_names = [n for n in b1 if frozen(n, ["vision"])]
    assert frozen_names and all(n.startswith("vision_model.") and ".merger." not in n for n in frozen_names)
    assert all(torch.equal(b1[n], a1[n]) for n in frozen_names)
    moved = [n for n in b1 if n not in frozen_names and not torch.equal(b1[n], a1[n])]
    assert len(moved) == len(b1) - len(frozen_names), sorted(set(b1) - set(frozen_names) - set(moved))[:5]
    assert all(not torch.equal(b0[n], a0[n]) for n in frozen_names)  # unfrozen, the same tensors do train
    elements = sum(b1[n].numel() for n in frozen_names)
    assert opt0 - opt1 == elements * 4 * 2 and grad0 - grad1 == elements * 4


def test_freeze_patterns_and_groups():
    from megatron_spark.models.freeze import frozen

    assert frozen("vision_model.decoder.layers.0.mlp.linear_fc1.weight", ["vision"])
    assert not frozen("vision_model.merger.linear_fc1.weight", ["vision"])
    assert frozen("vision_model.merger.linear_fc1.weight", ["projector"])
    assert frozen("language_model.decoder.layers.3.mlp.linear_fc2.weight", ["language_model"])
    assert frozen("decoder.layers.1.self_attention.linear_qkv.weight", [r"decoder\.layers\.[01]\."])
    assert not frozen("decoder.layers.11.self_attention.linear_qkv.weight", [r"decoder\.layers\.[01]\."])


@pytest.mark.parametrize("config", [TEXT, VL], ids=["text", "vl"])
def test_a_model_built_off_the_gpu_never_asks_for_gpu_memory(megatron, config, monkeypatch):
    """With CUDA available megatron-core creates parameters with device=cuda unless use_cpu_initialization is set,
    overriding a `torch.device("meta")` context: the converters' meta model of a 32B checkpoint would allocate
    ~131 GB of GPU memory. CUDA is reported available here: every config of a model built for 'meta' must
    initialise off the GPU (and the CPU shim would otherwise hide the allocation)."""
    from megatron_spark.models import build, qwen

    configs = []
    real = qwen._base_config

    def recording(*a, **kw):
        c = real(*a, **kw)
        configs.append(c)
        return c

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qwen, "_base_config", recording)
    # (convert/layout.checkpoint_layout builds exactly so: device="meta")
    build.build_model(parse_hf_config(config), _layout(), dtype=torch.float32, use_te=False, device="meta")
    assert configs and all(c.use_cpu_initialization for c in configs)
    configs.clear()
    build.BUILD_OFF_GPU.set(False)  # (what a training build on a GPU gets)
    assert not real(_layout(), torch.float32, False, num_layers=1, hidden_size=8,
                    num_attention_heads=1).use_cpu_initialization


def test_one_micro_batch_at_a_time_goes_to_the_device(megatron, monkeypatch):
    """A log-prob or update pass once moved every micro-batch of the call to the GPU before the first ran (with a
    dense [b, 1, s, s] mask each: 8-40 GiB for the 32B-VL example). Each must move when its step runs."""
    from megatron_spark.models import runtime
    from megatron_spark.models.build import build_model
    from megatron_spark.policy import Policy, Rollout

    moves, at_start = [], []
    real_to, real_schedule = runtime.Batch.to, runtime.run_schedule

    def counting_to(self, *a, **kw):
        moves.append(1)
        return real_to(self, *a, **kw)

    def schedule(*a, **kw):
        at_start.append(len(moves))
        return real_schedule(*a, **kw)

    monkeypatch.setattr(runtime.Batch, "to", counting_to)
    monkeypatch.setattr(runtime, "run_schedule", schedule)
    shape = parse_hf_config(TEXT)
    policy = Policy(build_model(shape, _layout(), dtype=torch.float32, device="cpu"), shape, pad_id=0,
                    micro_batch_size=1)
    out = policy.token_logprobs([Rollout(list(range(20, 20 + n)), [30, 31, 32], f"r{n}") for n in (5, 7, 9)])
    assert [len(x) for x in out] == [3, 3, 3]
    assert at_start == [0] and len(moves) == 3
