"""Students of every family and the KD recipes: training from the cache with exact resume after kill -9, one-head KD
and hard distillation against direct computations, weight schedules at their documented points."""
from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch

from shared.augment import ViewSpec
from shared.targets import encode_logits
from trainer.losses import CiTLoss, KDTerm, LossConfig, TargetModel
from trainer.objectives import CiTObjective, HardDistillation, OneHeadKD, WeightSchedule
from trainer.targets import Targets

TEMPS = (1.0, 2.0)


# -----------------------------------------------------------------------------------------------------------------
# Recipes against direct float64 computations

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _targets(teachers: dict[str, np.ndarray], labels: np.ndarray, c: int, k: int) -> Targets:
    cached = {n: encode_logits(torch.from_numpy(z), k, TEMPS) for n, z in teachers.items()}
    return Targets(torch.from_numpy(labels), cached, None, TargetModel(LossConfig(), c, TEMPS, k))


def test_one_head_kd_at_alpha_1_tau_1_is_the_cit_loss_on_that_head():
    rng = np.random.default_rng(0)
    b, c = 6, 10
    z = {"cls": torch.from_numpy(rng.normal(size=(b, c)) * 2)}
    labels = rng.integers(0, c, b)
    targets = _targets({"t": rng.normal(size=(b, c)) * 3}, labels, c, 4)
    kd, _ = OneHeadKD(["t"], alpha=1.0, tau=1.0, label_smoothing=0.1)(z, targets, 0)
    cit = CiTLoss(LossConfig(lambda0=0.0), [KDTerm("conv", "cls", "t", 1.0, 1.0)], c, temperatures=TEMPS)
    ref, _ = cit(z, targets.labels, targets.teachers)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-6)


def test_one_head_kd_with_two_teachers_averages_their_distributions():
    """(1 − α)·CE_ls + α·τ²·KL(mean of the teachers' tempered softmax ‖ σ(z/τ)), K = C (every class cached)."""
    rng = np.random.default_rng(1)
    b, c, alpha, tau, smoothing = 5, 8, 0.3, 2.0, 0.1
    z = rng.normal(size=(b, c)) * 2
    labels = rng.integers(0, c, b)
    teachers = {"a": rng.normal(size=(b, c)) * 3, "b": rng.normal(size=(b, c))}
    loss, parts = OneHeadKD(["a", "b"], alpha, tau, smoothing)({"cls": torch.from_numpy(z)},
                                                                _targets(teachers, labels, c, c), 0)
    q = np.mean([np.exp(_log_softmax(t / tau)) for t in teachers.values()], axis=0)
    kl = (q * (np.log(q) - _log_softmax(z / tau))).sum(1).mean() * tau * tau
    log_p = _log_softmax(z)
    ce = ((1 - smoothing) * -log_p[np.arange(b), labels] + smoothing * (-log_p).mean(1)).mean()
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kl, rel=1e-5)


def test_hard_distillation_fits_each_head_to_its_teachers_top1():
    rng = np.random.default_rng(2)
    b, c = 7, 10
    heads = {h: torch.from_numpy(rng.normal(size=(b, c))) for h in ("cls", "conv", "inv")}
    labels = rng.integers(0, c, b)
    teachers = {"a": rng.normal(size=(b, c)) * 3, "b": rng.normal(size=(b, c)) * 3}
    targets = _targets(teachers, labels, c, 3)
    assert torch.equal(targets.top1("a"), torch.from_numpy(teachers["a"].argmax(1)))
    terms = [KDTerm("conv", "conv", "a", 0.7, 1.0), KDTerm("inv", "inv", "b", 1.3, 1.0)]
    loss, parts = HardDistillation(terms, 0.5, 0.0)(heads, targets, 0)

    def ce(logits, y):
        return -_log_softmax(logits.numpy())[np.arange(b), y].mean()
    expected = 0.5 * ce(heads["cls"], labels) + 0.7 * ce(heads["conv"], teachers["a"].argmax(1)) \
        + 1.3 * ce(heads["inv"], teachers["b"].argmax(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(parts) == {"ce", "kd_conv", "kd_inv", "loss"}


@pytest.mark.parametrize("kind, first, middle, last", [
    ("constant", 1.0, 1.0, 1.0),
    ("linear", 1.0, (1 + 0.2) / 2, 0.2),
    ("cosine", 1.0, (1 + 0.2) / 2, 0.2),
])
def test_schedules_give_the_documented_weights(kind, first, middle, last):
    s = WeightSchedule(kind, final=0.2, total_steps=11)          # steps 0..10: the middle is step 5
    assert [s.factor(0), s.factor(5), s.factor(10)] == pytest.approx([first, middle, last], abs=1e-12)
    if kind == "cosine":                                         # cosine keeps more weight early than linear
        assert s.factor(2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 0.2)) / 2)
    kd = OneHeadKD(["t"], 0.8, 1.0, 0.0, s)
    assert kd.weights(10) == pytest.approx({"ce": 1 - 0.8 * last, "kd": 0.8 * last})
    cit = CiTObjective(CiTLoss(LossConfig(lambda0=0.5), [KDTerm("conv", "conv", "t", 2.0, 1.0)], 10), s)
    assert cit.weights(5) == pytest.approx({"ce": 0.5, "kd_conv": 2.0 * middle})


# -----------------------------------------------------------------------------------------------------------------
# Each family trains from a real cache and resumes exactly after kill -9 (a forked child kills itself)

from shared import checkpoint as model_checkpoint                          # noqa: E402
from shared.models import create_model                                    # noqa: E402
from tests.shard_fixtures import make_shards                              # noqa: E402
from tests.train_fixtures import build_cache                              # noqa: E402
from trainer import train as train_mod                                    # noqa: E402

SPEC = ViewSpec(image_size=28, ra_magnitude_std=0.0)
VIEW_SEED, VIEWS, N = 3, 2, 40
FAMILIES = {   # cut down to a few thousand parameters: the families' code paths, not their sizes
    "resnet10_student": {"channels": [8, 8, 16, 16], "stem_width": 8},
    "mixer_ti_student": {"num_blocks": 1, "embed_dim": 32},
    "vit_ti_student": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    train = make_shards(str(root / "train"), num_samples=N, shard_size=20, seed=0, prefix="tr")
    teachers = {}
    for name, arch in (("conv_a", "test_resnet"), ("conv_b", "test_efficientnet")):
        torch.manual_seed(len(name))
        model = create_model(arch, num_classes=10, in_chans=1, img_size=28, small_input=True).eval()
        path = str(root / f"{name}.safetensors")
        meta = model_checkpoint.save_checkpoint(model, path, {"kind": "conv", "mean": [0.4], "std": [0.3]})
        teachers[name] = {"model": model, "kind": "conv", "arch": arch, "mean": (0.4,), "std": (0.3,),
                          "sha256": meta.sha256, "checkpoint": path}
    build_cache(str(root / "cache"), train, SPEC, VIEW_SEED, VIEWS, teachers, topk=10, temperatures=TEMPS)
    return {"train": str(root / "train/tr.json"), "cache": str(root / "cache"), "teachers": teachers}


def _sets(data, arch: str, *extra: str) -> list[str]:
    return [f"data.train={json.dumps(data['train'])}", f"data.cache={json.dumps(data['cache'])}",
            f"data.view_seed={VIEW_SEED}", "augment.ra_magnitude_std=0.0", "data.num_workers=0",
            "train.progress=false", "train.batch_size=10", f"student.arch={arch}", 'kd.conv_teacher="conv_a"',
            'kd.inv_teacher="conv_b"', *(f"student.options.{k}={json.dumps(v)}" for k, v in FAMILIES[arch].items()),
            *extra]


def _config(data, arch: str, *extra: str):
    return train_mod.load_run_config(None, _sets(data, arch, "train.epochs=2", *extra))


def _killed_run(cfg, out: str) -> int:
    """``train`` in a forked child that SIGKILLs itself mid-run (``train.debug_kill_at_step``): a real kill -9 with
    no cleanup, without paying a fresh interpreter's imports; returns the child's exit code.  The caller runs
    single-threaded (OpenMP is not fork-safe; one thread also keeps parent and child bit-comparable)."""
    import multiprocessing
    child = multiprocessing.get_context("fork").Process(target=train_mod.train, args=(cfg, out), daemon=True)
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _state(run) -> dict[str, torch.Tensor]:
    from trainer.engine import load_state
    tensors, _ = load_state(str(run / "state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


@pytest.mark.parametrize("arch, recipe", [
    ("resnet10_student", ["objective.recipe=\"kd\"", "objective.alpha=0.7", "objective.schedule=\"linear\""]),
    ("mixer_ti_student", ["objective.recipe=\"hard\""]),
    ("vit_ti_student", ["objective.schedule=\"cosine\"", "objective.final=0.5"]),
])
def test_family_trains_from_the_cache_and_resumes_exactly_after_kill(data, tmp_path, one_thread, arch, recipe):
    train_mod.train(_config(data, arch, *recipe), str(tmp_path / "full"))
    killed = _killed_run(_config(data, arch, *recipe, "train.debug_kill_at_step=6"), str(tmp_path / "cut"))
    assert killed == -signal.SIGKILL                                   # 4 steps per epoch: died inside epoch 1
    from trainer.engine import load_state
    assert load_state(str(tmp_path / "cut/state.safetensors"))[1]["meta"]["epoch"] == 0
    train_mod.train(_config(data, arch, *recipe), str(tmp_path / "cut"), resume=True)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in open(tmp_path / "cut/metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1] and all(r["train_samples"] == N for r in lines)
    model, meta = model_checkpoint.load_checkpoint(str(tmp_path / "cut/student.safetensors"), expect_classes=10)
    assert meta.arch == arch
    heads = set(model.forward_heads(torch.zeros(1, 1, 28, 28)))
    if "kd" in recipe[0]:          # one-head KD: class head only; the linear schedule of α is logged per epoch
        assert heads == {"cls"} and all(r["train_kd"] > 0 for r in lines)
        steps = [0, 1, 2, 3], [4, 5, 6, 7]
        for r, epoch in zip(lines, steps):
            assert r["train_w_kd"] == pytest.approx(np.mean([0.7 * (1 - s / 7) for s in epoch]), rel=1e-5)
    else:
        assert heads == {"cls", "conv", "inv"}
        assert all(r["train_kd_conv"] > 0 and r["train_kd_inv"] > 0 for r in lines)


def test_hard_targets_are_the_cached_top1_and_the_live_argmax(data):
    from shared.augment import to_model_input
    from shared.cache_schema import LogitCache
    from trainer.data import make_loader
    cfg = train_mod.load_run_config(None, _sets(data, "vit_ti_student", "objective.recipe=\"hard\"",
                                                "train.epochs=1"))
    p = train_mod.prepare(cfg)
    cache = LogitCache.open(data["cache"])
    batch = next(iter(make_loader(p.train_set, N, 0, False)))
    targets = p.loss_fn.source(batch)
    rows = batch.rows.numpy()
    for name, t in data["teachers"].items():
        top = cache.read_topk(name, 0, 0, N)
        np.testing.assert_array_equal(targets.top1(name).numpy(), top.indices[rows, 0])
        with torch.no_grad():                                     # the teacher itself on the same replayed views
            live = t["model"](to_model_input(batch.views, t["mean"], t["std"])).argmax(1)
        np.testing.assert_array_equal(targets.top1(name).numpy(), live.numpy())


def test_a_tau_the_cache_lacks_warns_and_a_cached_one_does_not(data):
    import warnings
    cfg = lambda tau: train_mod.load_run_config(None, _sets(data, "vit_ti_student", "objective.recipe=\"kd\"",  # noqa
                                                             f"objective.tau={tau}", "train.epochs=1"))
    with pytest.warns(UserWarning, match=r"objective.tau=3 is not a temperature the cache holds \(1, 2\)"):
        train_mod.prepare(cfg(3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_mod.prepare(cfg(2.0))


def test_models_lists_the_student_families():
    from shared.models import describe_models, list_models
    assert {"resnet10_student", "mixer_ti_student", "vit_ti_student"} <= set(list_models())
    rows = {r["name"]: r for r in describe_models(["mixer_ti_student", "vit_ti_student", "student:resnet18"],
                                                  img_size=28, in_chans=1, num_classes=10)}
    assert all(r["kind"] == "student" for r in rows.values())
    assert rows["vit_ti_student"]["params"] > 5e6 > rows["mixer_ti_student"]["params"] > 1e6
