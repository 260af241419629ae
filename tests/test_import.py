"""`cit teacher import`: published weights become project checkpoints with identical logits; mismatches are named;
teachers with another native input size are resized on the device in the cache build and in online teachers;
`cit models` lists every builder."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

from shared.checkpoint import load_checkpoint, read_meta
from shared.cli import main
from shared.models import create_model, list_models
from shared.models.importers import ImportSpec, import_weights
from shared.models.normalize import resize_views, teacher_input
from tests.shard_fixtures import make_shards


def cit(*args: str):
    return CliRunner().invoke(main, list(args))


def same_logits(a: torch.nn.Module, b: torch.nn.Module, size: int = 32, chans: int = 3) -> None:
    x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        za, zb = a.eval()(x), b.eval()(x)
    assert torch.equal(za, zb), (za - zb).abs().max()


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory):
    """A timm resnet10t with 7 classes and non-trivial BN statistics, saved as a plain torch state dict."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=7).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))      # running stats differ from init: a missed buffer would show
    model.eval()
    path = str(tmp_path_factory.mktemp("timm") / "resnet10t.pth")
    torch.save(model.state_dict(), path)
    return model, path


def test_timm_state_dict_imports_with_equal_logits(tiny_timm, tmp_path):
    source, path = tiny_timm
    out = str(tmp_path / "teacher.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out)
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out)
    same_logits(model, source)
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    assert meta.num_classes == 7 and meta.in_chans == 3 and meta.kind == "conv"
    assert meta.img_size == cfg.input_size[-1] and meta.interpolation == cfg.interpolation
    assert tuple(meta.mean) == cfg.mean and tuple(meta.std) == cfg.std
    assert meta["imported_from"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    again = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out)
    assert again.exit_code == 2 and "--force" in again.output      # finished work is never overwritten silently


def test_wrapped_and_prefixed_checkpoints_import(tiny_timm, tmp_path):
    """{'state_dict': {'module.' + k: v}} as .pth (with non-tensor metadata beside it), and safetensors."""
    from safetensors.torch import save_file
    source, _ = tiny_timm
    wrapped = str(tmp_path / "ddp.pth")
    prefixed = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "arch": "resnet10t", "state_dict": prefixed}, wrapped)
    st = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, st)
    for path in (wrapped, st):
        model, meta = import_weights(ImportSpec("resnet10t", path, input_size=40, interpolation="bilinear",
                                                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
        same_logits(model, source)
        assert meta.img_size == 40 and meta.interpolation == "bilinear" and meta.mean == [0.5] * 3
    assert meta["imported_from"]["input_config"] == "command line"


# ---- the official RedNet naming (mmcls), written independently of the importer's table: ours -> mmcls ------

def _involution_to_mmcls(parts: list[str]) -> list[str]:
    head = {"reduce": ["conv1", "conv"], "bn": ["conv1", "bn"], "span": ["conv2", "conv"]}[parts[0]]
    return head + parts[1:]


def to_mmcls(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "fc":
        return "head." + name
    if parts[0] == "stem":
        index, rest = parts[1], parts[2:]
        if index in ("0", "4"):            # our Sequential(conv, bn, relu) is mmcls' ConvModule(conv, bn)
            rest = [{"0": "conv", "1": "bn"}[rest[0]]] + rest[1:]
        elif index == "1":                 # the stem's 3x3 involution
            rest = _involution_to_mmcls(rest)
        return ".".join(["backbone", "stem", index, *rest])
    assert parts[0] == "stages", name
    stage, block, rest = int(parts[1]), parts[2], parts[3:]
    if rest[0] == "conv2":                 # the bottleneck's 7x7 involution
        rest = ["conv2", *_involution_to_mmcls(rest[1:])]
    return ".".join(["backbone", f"layer{stage + 1}", block, *rest])


@pytest.fixture(scope="module")
def rednet26(tmp_path_factory):
    torch.manual_seed(1)
    model = create_model("rednet26", num_classes=10).train()
    with torch.no_grad():
        for m in model.modules():        # zero-init last BNs would hide a wrong residual mapping
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
        model(torch.randn(2, 3, 32, 32))
    return model.eval()


def test_official_rednet26_checkpoint_imports_with_equal_logits(rednet26, tmp_path):
    ours = rednet26.state_dict()
    official = {to_mmcls(k): v for k, v in ours.items()}
    assert len(official) == 251
    assert {"backbone.stem.0.conv.weight", "backbone.layer1.0.conv2.conv1.conv.weight", "head.fc.weight",
            "backbone.stem.1.conv2.conv.bias", "backbone.layer4.0.downsample.1.running_var"} <= set(official)
    path = str(tmp_path / "rednet26_mmcls.pth")
    torch.save({"meta": {"mmcls_version": "0.x", "CLASSES": ("a", "b")}, "state_dict": official}, path)
    out = str(tmp_path / "rednet26.safetensors")
    result = cit("teacher", "import", "--arch", "rednet26", "--weights", path, "--out", out)
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out)
    same_logits(model, rednet26)
    assert meta.kind == "inv" and meta["imported_from"]["names"] == "mmcls" and meta.img_size == 224
    assert meta["imported_from"]["tensors"] == 251


@pytest.mark.parametrize("depth, tensors", [(26, 251), (38, 351), (50, 451), (101, 876)])
def test_mmcls_table_maps_every_official_rednet_name(depth, tensors):
    from shared.models.importers import rename
    with torch.device("meta"):
        ours = list(create_model(f"rednet{depth}").state_dict())
    official = [to_mmcls(k) for k in ours]
    assert len(official) == tensors
    assert list(rename(official, "mmcls").values()) == ours


def test_coadvise_rednet_naming_imports(rednet26, tmp_path):
    coadvise = {}
    for k, v in rednet26.state_dict().items():
        name = to_mmcls(k)
        if name.startswith("head.fc."):
            name = "classifier." + name[len("head.fc."):]
        else:
            name = "model." + name[len("backbone."):]
        coadvise[name] = v
    path = str(tmp_path / "coadvise.pth")
    torch.save({"model": coadvise}, path)
    model, meta = import_weights(ImportSpec("rednet26", path))
    same_logits(model, rednet26)
    assert meta["imported_from"]["names"] == "coadvise" and meta["imported_from"]["entry"] == "model"


def test_torchvision_resnet18_imports_with_equal_logits(tmp_path):
    import torchvision
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    path = str(tmp_path / "resnet18-tv.pth")
    torch.save(tv.state_dict(), path)
    model, meta = import_weights(ImportSpec("resnet18", path, source="torchvision"))
    same_logits(model, tv)
    assert meta.arch == "resnet18.tv_in1k" and meta.interpolation == "bilinear" and meta.img_size == 224


# ---- refusals: one line naming the culprit, exit 2, nothing written -----------------------------------------

def test_bad_key_and_wrong_shape_are_named(tiny_timm, tmp_path):
    source, _ = tiny_timm
    state = dict(source.state_dict())
    state["layer1.0.extra.weight"] = state.pop("layer1.0.conv1.weight")
    bad_key = str(tmp_path / "bad_key.pth")
    torch.save(state, bad_key)
    out = str(tmp_path / "x.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", bad_key, "--out", out)
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "1 missing (layer1.0.conv1.weight)" in line and "1 unexpected (layer1.0.extra.weight)" in line
    assert not os.path.exists(out)

    state = dict(source.state_dict())
    state["layer2.0.conv2.weight"] = state["layer2.0.conv2.weight"][:, :3].clone()
    bad_shape = str(tmp_path / "bad_shape.pth")
    torch.save(state, bad_shape)
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", bad_shape, "--out", out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "layer2.0.conv2.weight (128, 3, 3, 3) vs model (128, 128, 3, 3)" in result.output
    assert not os.path.exists(out)


def test_unknown_arch_missing_file_and_wrong_source_are_refused(tiny_timm, tmp_path):
    _, path = tiny_timm
    out = str(tmp_path / "x.safetensors")
    for args, words in ((["--arch", "resnet_nope", "--weights", path], "neither rednet26/38/50/101 nor a timm"),
                        (["--arch", "resnet10t", "--weights", str(tmp_path / "none.pth")], "does not exist"),
                        (["--arch", "resnet10t", "--weights", path, "--from", "mmcls"], "RedNet names"),
                        (["--arch", "regnety_002", "--weights", path], "weights do not fit regnety_002")):
        result = cit("teacher", "import", *args, "--out", out)
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_pickled_objects_are_refused(tiny_timm, tmp_path):
    source, _ = tiny_timm
    path = str(tmp_path / "pickled.pth")
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    out = str(tmp_path / "x.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out)
    assert result.exit_code == 2 and "pickles objects other than tensors" in result.output
    assert not os.path.exists(out)


def test_stock_weights_never_go_into_a_small_input_stem_silently(tiny_timm, tmp_path):
    source, path = tiny_timm
    out = str(tmp_path / "small.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out, "--small-input")
    assert result.exit_code == 2 and "changes the stem" in result.output and "--allow-stem-change" in result.output
    assert "conv1.0: conv 3x3 stride 2 -> conv 3x3 stride 1" in result.output and "maxpool" in result.output
    assert not os.path.exists(out)
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out, "--small-input",
                 "--allow-stem-change")
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta.model_kwargs["small_input"] is True and "conv1.0" in meta["stem_changed"]
    # a stem whose tensors change shape (resnet18: 7x7 -> 3x3): named, left at initialisation
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pth")
    model, meta = import_weights(ImportSpec("resnet18", str(tmp_path / "r18.pth"), small_input=True,
                                            allow_stem_change=True))
    assert meta["stem_not_loaded"] == ["conv1.weight"] and tuple(model.conv1.weight.shape) == (64, 3, 3, 3)


# ---- per-teacher resize on the device ----------------------------------------------------------------------

def test_resize_views_matches_pil():
    views = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    image = Image.fromarray(views[0].permute(1, 2, 0).numpy())
    for size in (24, 11):
        pil = torch.from_numpy(np.array(image.resize((size, size), Image.BILINEAR))).permute(2, 0, 1).float()
        assert (resize_views(views, size, "bilinear")[0] - pil).abs().max() <= 1.0 + 1e-3   # PIL rounds to uint8
    # bicubic: PIL rounds and clamps to uint8 between its two passes, so compare on values that cannot overshoot
    mid = torch.randint(60, 196, (1, 3, 16, 16), dtype=torch.uint8)
    mid_image = Image.fromarray(mid[0].permute(1, 2, 0).numpy())
    for size in (24, 11):
        pil = torch.from_numpy(np.array(mid_image.resize((size, size), Image.BICUBIC))).permute(2, 0, 1).float()
        assert (resize_views(mid, size, "bicubic")[0] - pil).abs().max() <= 1.5
    twice = views.repeat_interleave(2, -1).repeat_interleave(2, -2).float()
    assert torch.equal(resize_views(views, 32, "nearest"), twice)
    assert torch.equal(teacher_input(views, [0.5], [0.25], 16, "bicubic"), teacher_input(views, [0.5], [0.25]))


def test_cache_and_online_teachers_resize_to_the_teachers_input(tiny_timm, tmp_path):
    """An imported teacher at 32 px on 16-px views: the cached logits are the teacher's on the 2x upscaled view
    (nearest: pixel replication, computed here independently), and the size is part of the cache identity."""
    from cache_builder.build import build_cache
    from shared.augment import ViewSpec, to_model_input
    from shared.cache_schema import LogitCache
    from shared.reader import Piece, read_piece
    from shared.views import render_view
    from trainer.train import load_online_teachers, load_run_config
    manifest = make_shards(str(tmp_path / "data"), num_samples=6, shard_size=6, num_classes=7, size=16, channels=3)
    source, path = tiny_timm
    ckpt = str(tmp_path / "t.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", ckpt,
                 "--input-size", "32", "--interpolation", "nearest")
    assert result.exit_code == 0, result.output
    spec = ViewSpec(image_size=16)
    out = str(tmp_path / "c.zarr")
    build_cache(manifest.path, {"t": ckpt}, out, views=1, topk=3, spec=spec, seed=0, batch_size=4, workers=0,
                threads=1, progress=False)
    cache = LogitCache.open(out)
    record = cache.attrs.teacher("t")
    assert record.input_size == 32 and record.interpolation == "nearest"
    assert cache.attrs.identity()["teachers"][0]["input_size"] == 32
    raws = read_piece(manifest, Piece(0, 0, 6))
    views = torch.stack([render_view(spec, 0, 0, raw)[0] for raw in raws])
    big = views.repeat_interleave(2, -1).repeat_interleave(2, -2)
    with torch.no_grad():
        expect = source(to_model_input(big, record.mean, record.std))
    topk = cache.read_topk("t", 0, 0, 6)
    top = torch.log_softmax(expect, 1).topk(3, dim=1)
    assert np.allclose(topk.logp.astype(np.float32), top.values.numpy(), atol=2e-3)   # fp16 log-probabilities
    assert np.array_equal(topk.indices[:, 0], expect.argmax(1).numpy())

    cfg = load_run_config(None, ['kd.mode="online"', 'kd.conv_teacher="t"', f'kd.checkpoints={{t="{ckpt}"}}',
                                 "augment.image_size=16"])
    online = load_online_teachers(cfg, {"t": record}, 7, 3, torch.device("cpu"))
    assert torch.allclose(online(views)["t"], expect, atol=1e-5)


def test_test_data_accuracy_is_measured_and_recorded(tiny_timm, tmp_path):
    manifest = make_shards(str(tmp_path / "test"), num_samples=10, shard_size=10, num_classes=7, size=12, channels=3)
    source, path = tiny_timm
    out = str(tmp_path / "t.safetensors")
    result = cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", out, "--input-size", "24",
                 "--interpolation", "bilinear", "--test-data", manifest.path)
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    # independently: every test image resized by PIL to 24 px, normalised, through the source model
    from shared.reader import Piece, read_piece
    raws = read_piece(manifest, Piece(0, 0, 10))
    images = [np.asarray(Image.open(io.BytesIO(r.data["png"])).convert("RGB")
                         .resize((24, 24), Image.BILINEAR)) for r in raws]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.no_grad():
        acc = (source(x).argmax(1) == torch.tensor([r.label for r in raws])).float().mean().item()
    assert meta.test_accuracy == pytest.approx(acc) and meta["test_samples"] == 10
    assert f"{acc * 100:.2f}%" in result.output


# ---- cit models, --help --------------------------------------------------------------------------------------

def test_cit_models_lists_every_builder():
    from shared.models_cli import format_rows
    result = cit("models", "--img-size", "32", "--timm", "resnet10t", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(list_models()) | {"resnet10t"}
    assert rows["rednet26"]["params"] == 9_233_166     # the published 9.23M
    assert rows["resnet10t"]["params"] == sum(p.numel() for p in timm.create_model("resnet10t").parameters())
    assert all(r["params"] > 0 and r["flops"] > 0 for r in rows.values())
    table = format_rows(list(rows.values()))
    assert "9,233,166" in table and "resnet10t" in table and "small-input stem" in table
    assert "models" in cit("--help").output
    assert cit("models", "--timm", "no_such_net").exit_code == 2


def test_teacher_import_help():
    from shared.models import importers
    from trainer import teacher_import
    assert teacher_import.SOURCES == importers.SOURCES and teacher_import.INTERPOLATIONS == importers.INTERPOLATIONS
    result = cit("teacher", "import", "--help")
    assert result.exit_code == 0 and "--weights" in result.output and "weights_only" in result.output


def test_cit_eval_teacher_comparison_resizes_the_teacher(tiny_timm, tmp_path):
    """`cit eval --teacher` on 16-px views with a 32-px teacher: the teacher's accuracy is its accuracy on the
    2x upscaled views (nearest = pixel replication, computed here independently)."""
    from shared.augment import ViewSpec, to_model_input
    from shared.checkpoint import save_checkpoint
    from shared.reader import Piece, read_piece
    from shared.views import render_eval
    from trainer.evaluate import evaluate_agreement
    from trainer.train import model_outputs
    manifest = make_shards(str(tmp_path / "test"), num_samples=12, shard_size=12, num_classes=7, size=16, channels=3)
    source, path = tiny_timm
    teacher = str(tmp_path / "t.safetensors")
    assert cit("teacher", "import", "--arch", "resnet10t", "--weights", path, "--out", teacher,
               "--input-size", "32", "--interpolation", "nearest").exit_code == 0
    spec = ViewSpec(image_size=16)
    student = create_model("cit_nano", num_classes=7, in_chans=3, img_size=16).eval()
    save_checkpoint(student, str(tmp_path / "s.safetensors"), {"kind": "student", "mean": [0.5], "std": [0.5],
                                                                "augment": spec.to_dict()})
    report = evaluate_agreement({"s": str(tmp_path / "s.safetensors")}, {"t": teacher}, [manifest.path],
                                batch_size=8, num_workers=0, device="cpu")
    raws = read_piece(manifest, Piece(0, 0, 12))
    views = torch.stack([render_eval(spec, r) for r in raws])
    meta = read_meta(teacher)
    with torch.no_grad():
        logits = source(to_model_input(views.repeat_interleave(2, -1).repeat_interleave(2, -2), meta.mean, meta.std))
        heads = model_outputs(student.forward_heads(to_model_input(views, [0.5], [0.5])))
    acc = (logits.argmax(1) == torch.tensor([r.label for r in raws])).float().mean().item()
    result = next(iter(report["sets"].values()))
    assert result["teachers"]["t"] == pytest.approx(acc)
    p = logits.softmax(1)     # KL(teacher || class head), per sample, averaged
    kl = (p * (logits.log_softmax(1) - heads["cls"].log_softmax(1))).sum(1).mean().item()
    assert result["students"]["s"]["kl"]["cls"]["t"] == pytest.approx(kl, rel=1e-4)
