"""Models: involution op vs the unfold reference, RedNet sizes, teachers/students build and train,
CiT token semantics, checkpoints (round trip and every way they can be wrong)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

from shared.checkpoint import CheckpointError, ModelMeta, load_checkpoint, read_meta, save_checkpoint, sidecar_path
from shared.models import (create_model, describe_models, is_model, list_models, model_kind)
from shared.models.involution import Involution, involution2d, involution_unfold_reference
from shared.models.normalize import Normalized


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine OpenMP barriers
    make them 20x slower; restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Involution op

@pytest.mark.parametrize("k,stride,channels,groups,size", [
    (3, 1, 16, 1, 9),
    (3, 2, 32, 2, 8),
    (7, 1, 32, 2, 10),
    (7, 2, 64, 4, 7),    # odd size with stride 2: ceil(7/2) = 4 outputs
    (7, 2, 16, 1, 13),
    (7, 1, 64, 64, 6),   # one channel per group
    (5, 3, 32, 4, 11),
])
def test_involution_matches_unfold_reference(k, stride, channels, groups, size):
    x = torch.randn(3, channels, size, size + 1)
    ho, wo = -(-size // stride), -(-(size + 1) // stride)
    w = torch.randn(3, groups * k * k, ho, wo)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = involution2d(xa, wa, k, stride, groups)
    ref = involution_unfold_reference(xb, wb, k, stride, groups)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wa.grad, wb.grad, atol=1e-5, rtol=1e-5)


def test_involution_gradcheck_float64():
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: involution2d(a, b, 3, 2, 1), (x, w))


def test_involution_chunked_equals_single_chunk(monkeypatch):
    import shared.models.involution as inv
    x = torch.randn(9, 32, 8, 8, requires_grad=True)
    w = torch.randn(9, 2 * 49, 8, 8, requires_grad=True)
    whole = inv.involution2d(x, w, 7, 1, 2)
    gx, gw = torch.autograd.grad(whole.square().sum(), (x, w))
    monkeypatch.setattr(inv, "_CPU_CHUNK_BYTES", 1)  # one sample per chunk
    chunked = inv.involution2d(x, w, 7, 1, 2)
    cx, cw = torch.autograd.grad(chunked.square().sum(), (x, w))
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(gx, cx)
    torch.testing.assert_close(gw, cw)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_involution_saves_no_k2_sized_tensor():
    x = torch.randn(4, 32, 14, 14, requires_grad=True)
    w = torch.randn(4, 2 * 49, 14, 14, requires_grad=True)
    light = _saved_bytes(lambda: involution2d(x, w, 7, 1, 2))
    naive = _saved_bytes(lambda: involution_unfold_reference(x, w, 7, 1, 2))
    inputs = (x.numel() + w.numel()) * 4
    assert light <= 1.5 * inputs                 # x and the kernels (padded to the wide rows: 20/14 here)
    assert naive > 49 * x.numel() * 4            # the unfold is K^2 times the input


def test_involution_layer_matches_reference_and_halves_size():
    layer = Involution(32, kernel_size=7, stride=2)
    assert layer.groups == 2 and layer.reduce.out_channels == 8 and layer.span.out_channels == 2 * 49
    assert layer.reduce.bias is None and layer.span.bias is not None
    x = torch.randn(2, 32, 7, 7)
    out = layer(x)
    assert out.shape == (2, 32, 4, 4)
    ref = involution_unfold_reference(x, layer.kernels(x), 7, 2, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride,size", [(2, (8, 8)), (2, (7, 9)), (3, (10, 11))])
def test_stride_pool_matches_avg_pool_ceil_mode(stride, size):
    from shared.models.involution import StridePool
    x = torch.randn(2, 16, *size, requires_grad=True)
    ours = StridePool(stride)(x)
    ref = nn.functional.avg_pool2d(x, stride, stride, ceil_mode=True)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_involution_bad_shapes():
    with pytest.raises(ValueError, match="weight shape"):
        involution2d(torch.randn(1, 16, 8, 8), torch.randn(1, 9, 7, 7), 3, 1, 1)
    with pytest.raises(ValueError, match="multiple of group_channels"):
        Involution(24)


# ---------------------------------------------------------------------------------------------------------------
# RedNet

@pytest.mark.parametrize("name,published", [("rednet26", 9.23e6), ("rednet38", 12.39e6), ("rednet50", 15.54e6),
                                            ("rednet101", 25.65e6)])
def test_rednet_param_counts_match_paper(name, published):
    with torch.device("meta"):  # no memory, no init cost
        model = create_model(name, num_classes=1000)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - published) / published < 0.005, params


def test_rednet_conv_twin_differs_only_in_mixer():
    inv = create_model("rednet_small", num_classes=10, in_chans=1)
    conv = create_model("rednet_small", num_classes=10, in_chans=1, mixer="conv")
    assert sum(isinstance(m, Involution) for m in inv.modules()) == 1 + 8  # stem + 8 bottlenecks
    assert not any(isinstance(m, Involution) for m in conv.modules())
    assert inv(torch.randn(2, 1, 28, 28)).shape == conv(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------------
# Every model builds, runs forward + backward at both small-image shapes

SMALL_MODELS = [
    ("rednet_small", {}),
    ("resnet18", {"small_input": True}),
    ("regnety_002", {"small_input": True}),
    ("timm:regnety_002", {"small_input": True}),
    ("cit_nano", {"token_mode": "random"}),
    ("cit_nano", {"token_mode": "align"}),
]


@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["28x28x1", "32x32x3"])
@pytest.mark.parametrize("name,options", SMALL_MODELS, ids=[f"{n}-{o.get('token_mode', '')}" for n, o in SMALL_MODELS])
def test_models_forward_backward(name, options, shape):
    chans, size = shape
    model = create_model(name, num_classes=7, in_chans=chans, img_size=size, **options).train()
    out = model(torch.rand(2, chans, size, size))
    heads = out if isinstance(out, dict) else {"cls": out}
    loss = sum(v.float().logsumexp(1).sum() for v in heads.values())
    loss.backward()
    assert all(v.shape == (2, 7) for v in heads.values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_small_input_keeps_resolution():
    seen = {}
    model = create_model("resnet18", num_classes=10, in_chans=1, small_input=True)
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape[-1]))
    model(torch.rand(1, 1, 28, 28))
    assert seen["layer1"] == 28
    regnet = create_model("regnety_002", num_classes=10, in_chans=1, small_input=True)
    assert regnet.stem.conv.stride == (1, 1)


def test_small_input_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="small_input=True is not supported for 'vit_tiny_patch16_224'"):
        create_model("vit_tiny_patch16_224", num_classes=10, small_input=True)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'rednet27'.*rednet26.*not a timm model"):
        create_model("rednet27")
    with pytest.raises(ValueError, match="unknown model 'timm:no_such_net'"):
        create_model("timm:no_such_net")
    assert not is_model("rednet27") and is_model("resnet18") and is_model("cit_tiny")
    assert {"rednet26", "rednet38", "rednet50", "rednet101", "rednet_small", "cit_nano", "cit_tiny",
            "cit_small"} <= set(list_models())
    assert (model_kind("rednet_small"), model_kind("resnet18"), model_kind("cit_nano")) == ("inv", "conv", "student")


def test_describe_models():
    rows = describe_models(["rednet_small", "regnety_002", "cit_nano"], img_size=28, in_chans=1, num_classes=10)
    assert [r["name"] for r in rows] == ["rednet_small", "regnety_002", "cit_nano"]
    assert rows[1]["small_input"] is True
    assert all(r["params"] > 0 and r["flops"] > 0 for r in rows)
    # the involution's own multiply-adds are counted (FlopCounterMode alone misses them)
    model = create_model("rednet_small", num_classes=10, in_chans=1)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    assert rows[0]["flops"] > counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------
# CiT student

@pytest.mark.parametrize("mode", ["random", "align"])
def test_student_three_heads_differ_and_all_get_gradient(mode):
    model = create_model("cit_nano", num_classes=10, in_chans=1, img_size=28, token_mode=mode).train()
    out = model(torch.rand(4, 1, 28, 28))
    assert set(out) == {"cls", "conv", "inv"}
    assert not torch.allclose(out["cls"], out["conv"]) and not torch.allclose(out["conv"], out["inv"])
    for name, module in model.head_modules().items():
        model.zero_grad()
        out = model(torch.rand(4, 1, 28, 28))
        out[name].sum().backward()
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
        others = [m for n, m in model.head_modules().items() if n != name]
        assert all(m.weight.grad is None or m.weight.grad.abs().sum() == 0 for m in others)


def test_student_align_tokens_are_stem_means():
    model = create_model("cit_nano", num_classes=10, in_chans=1, img_size=28, token_mode="align").eval()
    assert not hasattr(model, "conv_token") or model.conv_token is None
    assert {"conv_token", "inv_token"}.isdisjoint(dict(model.named_parameters()))
    captured = {}
    model.conv_stem.proj.register_forward_hook(lambda m, i, o: captured.__setitem__("conv", o))
    model.inv_stem.proj.register_forward_hook(lambda m, i, o: captured.__setitem__("inv", o))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model.embed(x)
    conv, inv = captured["conv"], captured["inv"]
    assert conv.shape == (3, 96, 7, 7)
    torch.testing.assert_close(tokens[:, 1], conv.mean((2, 3)))
    torch.testing.assert_close(tokens[:, 2], inv.mean((2, 3)))
    torch.testing.assert_close(tokens[:, 3:], (conv + inv).flatten(2).transpose(1, 2))
    assert model.pos_embed.shape == (1, 3 + 49, 96)


def test_student_random_tokens_are_parameters():
    model = create_model("cit_nano", num_classes=10, in_chans=3, img_size=32, token_mode="random")
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "conv_token", "inv_token"}
    tokens = model.embed(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(tokens[0, 1], model.conv_token[0, 0])
    torch.testing.assert_close(tokens[1, 2], model.inv_token[0, 0])
    assert model.pos_embed.shape == (1, 3 + 64, 96)


@pytest.mark.parametrize("mode", ["random", "align"])
def test_student_token_ablations(mode):
    one = create_model("cit_nano", num_classes=10, in_chans=1, img_size=28, token_mode=mode, heads=("cls",))
    assert list(one.head_modules()) == ["cls"]
    assert sum(isinstance(m, nn.Linear) and m.out_features == 10 for m in one.modules()) == 1
    assert set(one.train()(torch.rand(2, 1, 28, 28))) == {"cls"}
    assert one.pos_embed.shape[1] == 1 + 49
    two = create_model("cit_nano", num_classes=10, in_chans=1, img_size=28, token_mode=mode, heads=["inv", "cls"])
    assert two.heads == ("cls", "inv") and set(two.train()(torch.rand(2, 1, 28, 28))) == {"cls", "inv"}
    with pytest.raises(ValueError, match="heads"):
        create_model("cit_nano", img_size=28, heads=("conv", "inv"))


def test_student_eval_outputs():
    model = create_model("cit_nano", num_classes=10, in_chans=1, img_size=28, eval_head="mean").eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        heads = model.forward_heads(x)
        mean = model(x)
        cls = model.predict(x, "cls")
    torch.testing.assert_close(mean, (heads["cls"] + heads["conv"] + heads["inv"]) / 3)
    torch.testing.assert_close(cls, heads["cls"])
    model.eval_head = "cls"
    with torch.no_grad():
        torch.testing.assert_close(model(x), heads["cls"])


def test_student_sizes():
    with torch.device("meta"):
        tiny = create_model("cit_tiny", num_classes=10, img_size=32)
        small = create_model("cit_small", num_classes=10, img_size=224)
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].attn.num_heads) == (192, 12, 3)
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 12, 6)
    assert small.patch_size == 16 and small.pos_embed.shape[1] == 3 + 196


def test_normalized_wrapper():
    model = create_model("rednet_small", num_classes=10, in_chans=1).eval()
    wrapped = Normalized(model, [0.5], [0.25]).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - 0.5) / 0.25))
    assert "mean" not in wrapped.state_dict()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

def _roundtrip(tmp_path, name, **kwargs):
    model = create_model(name, num_classes=10, in_chans=1, img_size=28, **kwargs)
    model.train()(torch.rand(8, 1, 28, 28))  # move BN running stats away from their init
    model.eval()
    path = tmp_path / f"{name}.safetensors"
    meta = save_checkpoint(model, path, {"kind": model_kind(name), "mean": [0.286], "std": [0.353],
                                         "test_accuracy": 0.91, "dataset_fingerprint": "abc"})
    return model, path, meta


@pytest.mark.parametrize("name,options", [("rednet_small", {}), ("regnety_002", {"small_input": True}),
                                          ("cit_nano", {"token_mode": "align", "heads": ("cls", "inv")})])
def test_checkpoint_roundtrip_identical_outputs(tmp_path, name, options):
    model, path, meta = _roundtrip(tmp_path, name, **options)
    loaded, meta2 = load_checkpoint(path, expect_classes=10, expect_in_chans=1)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert meta2 == meta and meta2.sha256 and meta2.get("dataset_fingerprint") == "abc"
    assert meta2.get("mean") == [0.286] and meta2["test_accuracy"] == 0.91
    side = json.loads(open(sidecar_path(path)).read())
    assert side["arch"] == name and side["num_classes"] == 10 and side["in_chans"] == 1 and side["img_size"] == 28
    assert side["kind"] == model_kind(name)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, path.stem + ".json"])  # no temp files left


def test_checkpoint_normalized_load(tmp_path):
    model, path, _ = _roundtrip(tmp_path, "rednet_small")
    wrapped, _ = load_checkpoint(path, normalized=True)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), model((x - 0.286) / 0.353))


def test_checkpoint_expectation_mismatch_names_file(tmp_path):
    _, path, _ = _roundtrip(tmp_path, "rednet_small")
    with pytest.raises(CheckpointError, match=rf"{path.name}.*10 classes but 100 are expected"):
        load_checkpoint(path, expect_classes=100)
    with pytest.raises(CheckpointError, match=rf"{path.name}.*1 input channels but 3 are expected"):
        load_checkpoint(path, expect_in_chans=3)


def test_checkpoint_truncated_or_modified(tmp_path):
    _, path, _ = _roundtrip(tmp_path, "rednet_small")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*truncated"):
        load_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=rf"{path.name}.*truncated"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{path.name}.*sha256"):
        load_checkpoint(path)


def test_checkpoint_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    _, path, _ = _roundtrip(tmp_path, "rednet_small")
    os.unlink(sidecar_path(path))
    with pytest.raises(CheckpointError, match="sidecar"):
        load_checkpoint(path)


def test_checkpoint_weights_must_fit_architecture(tmp_path):
    _, path, meta = _roundtrip(tmp_path, "rednet_small")
    side = sidecar_path(path)
    data = json.loads(open(side).read())
    data["model_kwargs"]["base_width"] = 32
    open(side, "w").write(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"{path.name}.*do not fit 'rednet_small'"):
        load_checkpoint(path)


def test_model_meta_json_roundtrip():
    meta = ModelMeta(arch="resnet18", num_classes=10, in_chans=1, kind="conv", mean=[0.5], std=[0.5],
                     model_kwargs={"small_input": True}, extra={"note": "x"})
    assert ModelMeta.from_json(meta.to_json()) == meta
    with pytest.raises(ValueError, match="kind"):
        ModelMeta(arch="a", num_classes=1, in_chans=1, kind="teacher")
    assert read_meta  # exported
