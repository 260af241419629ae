"""Stage 2: the loss (Eq. 1), the cache join, cached/online parity, resume, DDP, and clear errors on bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared.targets import encode_logits
from trainer.losses import CiTLoss, KDTerm, LossConfig, TargetModel, kd_kl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------------------------------------------
# Loss: a direct float64 computation of Eq. 1 on hand-made logits

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _teacher_probs(full: np.ndarray, k: int, tau: float) -> np.ndarray:
    """The documented target, from the full logits: the true top-k probabilities at τ, the true tail mass at τ
    spread evenly over the other C − k classes."""
    b, c = full.shape
    p = np.exp(_log_softmax(full / tau))
    top = np.argsort(-full, 1)[:, :k]
    q = np.empty_like(p)
    for i in range(b):
        q[i, :] = (1.0 - p[i, top[i]].sum()) / (c - k) if k < c else 0.0
        q[i, top[i]] = p[i, top[i]]
    return q


def _eq1(student: dict[str, np.ndarray], labels: np.ndarray, teachers: list[np.ndarray], k: int,
         lambdas: tuple, taus: tuple, smoothing: float) -> float:
    log_q = _log_softmax(student["cls"])
    nll = -log_q[np.arange(len(labels)), labels]
    ce = ((1 - smoothing) * nll + smoothing * (-log_q).mean(1)).mean()
    total = lambdas[0] * ce
    for head, full, lam, tau in zip(("conv", "inv"), teachers, lambdas[1:], taus):
        p = _teacher_probs(full, k, tau)
        log_s = _log_softmax(student[head] / tau)
        kl = (p * (np.log(np.where(p > 0, p, 1.0)) - log_s)).sum(1).mean()
        total += lam * tau * tau * kl
    return float(total)


TEMPS = (0.5, 1.0, 2.0)


def _topk(full: np.ndarray, k: int, rounded: bool = False):
    """The cached record of ``full`` at the temperatures ``TEMPS`` (fp16 like the store when ``rounded``)."""
    logp, indices, tail = encode_logits(torch.from_numpy(full), k, TEMPS)
    if rounded:
        logp, tail = logp.half(), tail.half()
    return logp, indices, tail


@pytest.mark.parametrize("taus", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("rounded", [False, True])
def test_loss_equals_eq1_with_the_exact_tail(taus, rounded):
    rng = np.random.default_rng(0)
    b, c, k = 6, 12, 4
    student = {h: rng.normal(size=(b, c)) * 2 for h in ("cls", "conv", "inv")}
    teachers = [rng.normal(size=(b, c)) * 3 for _ in range(2)]
    labels = rng.integers(0, c, b)
    lambdas, smoothing = (0.7, 1.3, 0.4), 0.1
    cfg = LossConfig(lambda0=lambdas[0], lambda1=lambdas[1], lambda2=lambdas[2], tau1=taus[0], tau2=taus[1],
                     label_smoothing=smoothing)
    terms = [KDTerm("conv", "conv", "t1", cfg.lambda1, cfg.tau1), KDTerm("inv", "inv", "t2", cfg.lambda2, cfg.tau2)]
    loss_mod = CiTLoss(cfg, terms, c, temperatures=TEMPS).double()
    targets = {"t1": _topk(teachers[0], k, rounded), "t2": _topk(teachers[1], k, rounded)}
    loss, parts = loss_mod({h: torch.from_numpy(v) for h, v in student.items()}, torch.from_numpy(labels), targets)
    expected = _eq1(student, labels, teachers, k, lambdas, taus, smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-3 if rounded else 1e-5)
    assert set(parts) == {"ce", "kd_conv", "kd_inv", "loss"}


def test_target_is_exact_and_spreads_the_tail_uniformly():
    rng = np.random.default_rng(1)
    full = rng.normal(size=(5, 10)) * 2
    loss = CiTLoss(LossConfig(), [], 10, temperatures=TEMPS)
    for tau in TEMPS:
        q = loss.model.log_probs(_topk(full, 3), tau).exp().double()
        np.testing.assert_allclose(q.numpy(), _teacher_probs(full, 3, tau), rtol=1e-5, atol=1e-7)
        assert torch.allclose(q.sum(1), torch.ones(5, dtype=torch.float64))                # total mass 1
    # K = C: the teacher's full tempered distribution (τ = 1 skips the divide, τ = 2 does not)
    for tau in (1.0, 2.0):
        q = loss.model.log_probs(_topk(full, 10), tau).exp().double().numpy()
        np.testing.assert_allclose(q, np.exp(_log_softmax(full / tau)), rtol=1e-5)
    # renormalise: no tail mass, the top-k renormalised at τ
    renorm = TargetModel(LossConfig(tail="renormalize"), 10, TEMPS).log_probs(_topk(full, 3), 2.0)
    p = _teacher_probs(full, 3, 2.0)
    top = np.argsort(-full, 1)[:, :3]
    np.testing.assert_allclose(renorm.exp().double().numpy(), _renormalised(p, top), rtol=1e-5, atol=1e-7)


def _renormalised(p: np.ndarray, top: np.ndarray) -> np.ndarray:
    out = np.zeros_like(p)
    for i in range(len(p)):
        out[i, top[i]] = p[i, top[i]] / p[i, top[i]].sum()
    return out


@pytest.mark.parametrize("tail", ["uniform", "renormalize"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_loss_topk_cuts_a_full_cache_and_online_logits_alike(tail, tau):
    """loss.topk=k on a K=C cache, on a K=k cache and on dense online logits: one and the same target."""
    rng = np.random.default_rng(2)
    full = rng.normal(size=(6, 10)) * 2
    student = {"cls": torch.randn(6, 10), "conv": torch.randn(6, 10)}
    labels = torch.arange(6) % 10
    terms = [KDTerm("conv", "conv", "t", 1.0, tau)]
    cut = CiTLoss(LossConfig(topk=3, tail=tail, tau1=tau), terms, 10, temperatures=TEMPS)
    from_full_cache = cut(student, labels, {"t": _topk(full, 10)})[0]
    from_online = cut(student, labels, {"t": torch.from_numpy(full).float()})[0]
    plain = CiTLoss(LossConfig(tail=tail, tau1=tau), terms, 10, temperatures=TEMPS)
    from_k3_cache = plain(student, labels, {"t": _topk(full, 3)})[0]
    uncut = plain(student, labels, {"t": _topk(full, 10)})[0]
    online_k3 = CiTLoss(LossConfig(tail=tail, tau1=tau), terms, 10, cache_topk=3)(
        student, labels, {"t": torch.from_numpy(full).float()})[0]
    assert torch.allclose(from_full_cache, from_k3_cache, atol=1e-6)
    assert torch.allclose(from_online, from_k3_cache, atol=1e-6)
    assert torch.allclose(online_k3, from_k3_cache, atol=1e-6)     # online targets cut to the cache's K
    assert not torch.allclose(uncut, from_k3_cache, atol=1e-3)
    with pytest.raises(ValueError, match="loss.topk"):
        LossConfig(topk=-1)
    with pytest.raises(ValueError, match="loss.topk=11 is more than the 10 classes"):
        CiTLoss(LossConfig(topk=11), terms, 10)


def test_kl_is_batchmean_times_tau_squared():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 3, 1), torch.log_softmax(t / 3, 1), reduction="batchmean",
                                     log_target=True) * 9
    assert kd_kl(s, torch.log_softmax(t / 3, 1), 3.0).item() == pytest.approx(ref.item(), rel=1e-5)   # log-probs at τ


# -----------------------------------------------------------------------------------------------------------------
# Fixtures: tiny shards, a real cache of two teachers' logits (K = C, E = 3), tiny models

from shared import checkpoint as model_checkpoint                          # noqa: E402
from shared.augment import ViewSpec                                       # noqa: E402
from shared.cache_schema import CacheError                                # noqa: E402
from shared.config import ConfigError                                     # noqa: E402
from shared.models import create_model                                    # noqa: E402
from tests.shard_fixtures import make_shards                              # noqa: E402
from tests.train_fixtures import build_cache                              # noqa: E402
from trainer import train as train_mod                                    # noqa: E402
from trainer.data import Batch, DataError, collate, make_loader                               # noqa: E402
from trainer.engine import CheckpointError                                # noqa: E402

SPEC = ViewSpec(image_size=28, ra_magnitude_std=0.0)   # fixed magnitude: any fixed spec works, it must match
VIEW_SEED, VIEWS, N = 5, 3, 101      # odd N: DDP ranks get 50 and 51 rows
TINY_STUDENT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_width": 32}   # cit_nano, cut down
# Small timm CNNs as teachers: the trainer does not care about their bias, and RedNet at 28 px is too slow here
TEACHERS = {"conv_a": ("test_resnet", "conv", {"small_input": True}),
            "conv_b": ("test_efficientnet", "conv", {"small_input": True})}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shards (train, test, other), two real teachers saved as checkpoints, and their K = C cache over E views."""
    root = tmp_path_factory.mktemp("train")
    train = make_shards(str(root / "train"), num_samples=N, shard_size=25, seed=0, prefix="tr")
    make_shards(str(root / "test"), num_samples=32, shard_size=32, seed=1, prefix="te")
    make_shards(str(root / "other"), num_samples=N, shard_size=25, seed=2, prefix="ot")
    teachers = {}
    for name, (arch, kind, options) in TEACHERS.items():
        torch.manual_seed(len(name))
        model = create_model(arch, num_classes=10, in_chans=1, img_size=28, **options).eval()
        path = str(root / f"{name}.safetensors")
        meta = model_checkpoint.save_checkpoint(model, path, {"kind": kind, "mean": [0.4], "std": [0.3]})
        teachers[name] = {"model": model, "kind": kind, "arch": arch, "mean": (0.4,), "std": (0.3,),
                          "sha256": meta.sha256, "checkpoint": path}
    build_cache(str(root / "cache"), train, SPEC, VIEW_SEED, VIEWS, teachers, topk=10)
    return {"root": root, "train": str(root / "train/tr.json"), "test": str(root / "test/te.json"),
            "other": str(root / "other/ot.json"), "cache": str(root / "cache"), "teachers": teachers}


def config(data, *extra: str, epochs: int = 2, mode: str = "cached", conv: str = "conv_a", inv: str = "conv_b"):
    sets = [f"data.train={json.dumps(data['train'])}", f"data.cache={json.dumps(data['cache'])}",
            f"data.view_seed={VIEW_SEED}", "augment.ra_magnitude_std=0.0", "data.num_workers=0",
            f"train.epochs={epochs}", "train.batch_size=16", "train.progress=false", f"kd.mode={mode}",
            f"kd.conv_teacher={json.dumps(conv)}", f"kd.inv_teacher={json.dumps(inv)}",
            *(f"student.options.{k}={v}" for k, v in TINY_STUDENT.items()), *extra]
    return train_mod.load_run_config(None, sets)


# -----------------------------------------------------------------------------------------------------------------
# The join

def test_join_reads_one_block_per_piece_and_matches_the_cache(data):
    from shared.cache_schema import LogitCache
    p = train_mod.prepare(config(data))
    ds = p.train_set
    cache = LogitCache.open(data["cache"])
    for epoch in (0, 4):                      # view 0, then view 4 mod 3 = 1
        ds.set_epoch(epoch)
        ds.reads = 0
        batch = Batch.cat(list(ds))
        assert sorted(batch.rows.tolist()) == list(range(N))
        pieces = len(ds.stream.pieces())
        assert ds.reads == pieces * 8         # params, digests + two teachers' three arrays, once per piece
        for j, row in enumerate(batch.rows[:10].tolist()):
            top = cache.read_topk("conv_b", epoch % VIEWS, row, row + 1)
            np.testing.assert_array_equal(batch.topk_logp[1, j].numpy(), top.logp[0])
            np.testing.assert_array_equal(batch.topk_tail[1, j].numpy(), top.tail[0])
            np.testing.assert_array_equal(batch.topk_indices[1, j].numpy(), top.indices[0])


def test_replay_drift_is_detected(data, monkeypatch):
    p = train_mod.prepare(config(data))
    import shared.views as views_mod
    real = views_mod.sample_view
    monkeypatch.setattr(views_mod, "sample_view", lambda spec, seed, key, view: real(spec, seed + 1, key, view))
    with pytest.raises(DataError, match="differs from the view the cache's teachers saw: params check failed"):
        next(iter(p.train_set))


# -----------------------------------------------------------------------------------------------------------------
# Cached mode runs no teacher; bad input fails before the first step

def _forbid_teachers(monkeypatch):
    import shared.models as models
    built, real = [], models.create_model

    def student_only(name, **kw):
        if name != "cit_nano":
            raise AssertionError(f"teacher {name!r} constructed in cached mode")
        built.append(name)
        return real(name, **kw)

    def no_checkpoint(*a, **k):
        raise AssertionError("a teacher checkpoint was loaded in cached mode")

    monkeypatch.setattr(models, "create_model", student_only)
    monkeypatch.setattr(model_checkpoint, "load_checkpoint", no_checkpoint)
    monkeypatch.setattr(train_mod.OnlineTeachers, "forward", no_checkpoint)
    return built


def test_cached_mode_never_runs_a_teacher(data, tmp_path, monkeypatch):
    built = _forbid_teachers(monkeypatch)
    result = train_mod.train(config(data, epochs=2), str(tmp_path / "run"))
    assert built == ["cit_nano"]
    lines = [json.loads(x) for x in open(tmp_path / "run/metrics.jsonl")]
    assert [r["view"] for r in lines] == [0, 1] and all(r["train_samples"] == N for r in lines)
    assert all(r["train_kd_conv"] > 0 and r["train_kd_inv"] > 0 for r in lines)
    assert len(result.history) == 2


@pytest.mark.parametrize("variant, sets, heads, parts", [
    ("none", ["kd.mode=none", 'kd.conv_teacher=""', 'kd.inv_teacher=""'], {"cls"}, {"ce"}),
    ("conv only", ['kd.inv_teacher=""'], {"cls", "conv"}, {"ce", "kd_conv"}),
    ("inv only", ['kd.conv_teacher=""'], {"cls", "inv"}, {"ce", "kd_inv"}),
    ("two of a kind", ['kd.inv_teacher="conv_a"'], {"cls", "conv", "inv"}, {"ce", "kd_conv", "kd_inv"}),
    ("one token", ["kd.shared_token=true"], {"cls"}, {"ce", "kd_conv", "kd_inv"}),
])
def test_ablation_variants_from_one_command_line(data, variant, sets, heads, parts):
    p = train_mod.prepare(config(data, *sets, epochs=1))
    assert set(p.student.heads) == heads, variant
    batch = next(iter(make_loader(p.train_set, 8, 0, pin_memory=False)))
    p.student.train()
    loss, got = p.loss_fn(p.student, batch)
    assert {k for k in got if k not in ("loss", "acc")} == parts, variant
    assert torch.isfinite(loss)


def _fails_before_training(tmp_path, cfg, error, match):
    with pytest.raises(error, match=match):
        train_mod.train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run/state.safetensors")


def test_cache_from_other_shards(data, tmp_path):
    _fails_before_training(tmp_path, config(data, f"data.train={json.dumps(data['other'])}"), CacheError,
                           "cache from other shards")


def test_teacher_not_in_cache(data, tmp_path):
    _fails_before_training(tmp_path, config(data, conv="resnet"), CacheError,
                           r"teacher 'resnet' is not in it \(it has \['conv_a', 'conv_b'\]\)")


def test_cache_class_count_differs_from_student(data, tmp_path):
    make_shards(str(tmp_path / "c12"), num_samples=N, shard_size=25, seed=0, num_classes=12, prefix="tr")
    cfg = config(data, f"data.train={json.dumps(str(tmp_path / 'c12/tr.json'))}")
    _fails_before_training(tmp_path, cfg, CacheError, "it has 10 classes, the student 12")


def test_augmentation_or_seed_differs(data, tmp_path):
    _fails_before_training(tmp_path, config(data, "augment.hflip=0.0", "data.view_seed=6"), CacheError,
                           r"augmentation seed is 5, data.view_seed is 6; .*hflip: cache 0.5 vs config 0.0")


def test_more_epochs_than_views(data, tmp_path):
    _fails_before_training(tmp_path, config(data, epochs=VIEWS + 1), DataError, "--allow-repeat-views")
    with pytest.warns(UserWarning, match="replay views"):
        train_mod.prepare(config(data, "data.allow_repeat_views=true", epochs=VIEWS + 1))


def test_misconfigured_kd(data, tmp_path):
    _fails_before_training(tmp_path, config(data, conv="", inv=""), ConfigError, "no teacher is mapped")
    _fails_before_training(tmp_path, config(data, 'data.cache=""'), ConfigError, "needs a logit cache")
    _fails_before_training(tmp_path, config(data, 'student.heads=["cls", "conv"]'), ConfigError, "needs a 'inv' head")
    with pytest.raises(ConfigError, match="unknown option"):
        config(data, "loss.lambda3=1")


def test_corrupt_checkpoint_on_resume(data, tmp_path):
    run = tmp_path / "run"
    train_mod.train(config(data, epochs=1), str(run))
    state = run / "state.safetensors"
    blob = bytearray(state.read_bytes())
    blob[-100] ^= 0xFF                                     # one flipped bit in the tensor bytes
    state.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        train_mod.train(config(data, epochs=2), str(run), resume=True)
    state.write_bytes(bytes(blob[: len(blob) // 2]))       # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_mod.train(config(data, epochs=2), str(run), resume=True)
    with pytest.raises(CheckpointError, match="no training state"):
        train_mod.train(config(data, epochs=2), str(tmp_path / "empty"), resume=True)


# -----------------------------------------------------------------------------------------------------------------
# Resume after kill -9, and 2-process DDP: subprocesses running the real CLI

def _cli_args(data, out, *extra: str, epochs: int = 3) -> list[str]:
    args = ["--data", data["train"], "--cache", data["cache"], "--conv-teacher", "conv_a", "--inv-teacher", "conv_b",
            "--epochs", str(epochs), "--batch-size", "10", "--out", str(out),
            "--set", f"data.view_seed={VIEW_SEED}", "--set", "augment.ra_magnitude_std=0.0",
            "--set", "train.progress=false", *[a for k, v in TINY_STUDENT.items()
                                                for a in ("--set", f"student.options.{k}={v}")]]
    for item in extra:
        args += ["--set", item] if "=" in item else [item]
    return args


def _cli(data, out, *extra: str, epochs: int = 3, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, *launcher, "-m", "trainer.cli", "train", *_cli_args(data, out, *extra, epochs=epochs)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _cli_in_process(data, out, *extra: str, epochs: int = 3):
    """``cit train`` with ``_cli``'s arguments through the real entry point, in this process (one OpenMP thread, as
    in the subprocesses): for a run that is not killed (a reference, a resume)."""
    from click.testing import CliRunner

    from shared.cli import main as cit
    assert torch.get_num_threads() == 1
    return CliRunner().invoke(cit, ["train", *_cli_args(data, out, *extra, epochs=epochs)])


def _weights(run) -> dict[str, torch.Tensor]:
    from trainer.engine import load_state
    tensors, _ = load_state(str(run / "state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def test_kill_mid_epoch_then_resume_equals_uninterrupted(data, tmp_path):
    full = _cli_in_process(data, tmp_path / "full", "data.num_workers=2")     # the uninterrupted reference
    assert full.exit_code == 0, full.output[-2000:]
    from shared.cli import main as cit
    from tests.cache_fixtures import ForkedCli
    killed = ForkedCli(cit, ["train", *_cli_args(data, tmp_path / "cut", "data.num_workers=2",
                                                 "train.debug_kill_at_step=15")], str(tmp_path))   # epoch 1 of 11/epoch
    assert killed.wait(240) == -signal.SIGKILL, killed.communicate()[1][-2000:]
    from trainer.engine import load_state
    _, info = load_state(str(tmp_path / "cut/state.safetensors"))
    assert info["meta"]["epoch"] == 0                                  # died inside epoch 1
    resumed = _cli_in_process(data, tmp_path / "cut", "data.num_workers=2", "--resume")   # not killed: here
    assert resumed.exit_code == 0, resumed.output[-2000:]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    lines = [json.loads(x) for x in open(tmp_path / "cut/metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [0, 1, 2]


def test_torchrun_two_ranks_see_every_sample_once_per_epoch(data, tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    run = _cli(data, tmp_path / "ddp", "train.debug_rows=true", "data.num_workers=1", epochs=2, launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    seen: dict[int, list[int]] = {0: [], 1: []}
    per_rank: dict[tuple[int, int], int] = {}
    for rank in (0, 1):
        for line in open(tmp_path / f"ddp/rows.rank{rank}.jsonl"):
            rec = json.loads(line)
            seen[rec["epoch"]] += rec["rows"]
            per_rank[rec["epoch"], rank] = len(rec["rows"])
    for epoch, rows in seen.items():
        assert sorted(rows) == list(range(N)), epoch                    # every sample once, none twice
        assert sorted([per_rank[epoch, 0], per_rank[epoch, 1]]) == [50, 51]   # uneven ranks: Join, no hang
    lines = [json.loads(x) for x in open(tmp_path / "ddp/metrics.jsonl")]
    assert [r["train_samples"] for r in lines] == [N, N]


def test_shipped_configs_parse():
    import glob
    paths = glob.glob(os.path.join(REPO, "configs", "**", "*.toml"), recursive=True)
    assert len(paths) >= 8
    variants = {}
    for path in paths:
        cfg = train_mod.load_run_config(path)
        variants[os.path.basename(path)] = (cfg.kd.mode, train_mod.student_heads(cfg))
    assert variants["none.toml"] == ("none", ("cls",))
    assert variants["one_token.toml"] == ("cached", ("cls",))
    assert variants["cit.toml"] == ("cached", ("cls", "conv", "inv"))


# -----------------------------------------------------------------------------------------------------------------
# Parity: cached KD (K = C, fp16 logits) == online KD (teachers live on the same replayed views)

def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def test_cached_and_online_kd_agree(data, tmp_path, monkeypatch):
    """Same seed, same views: cached KD (K = C) and online KD (teachers loaded from the checkpoints the cache
    records) give the same losses and weights.  With the online targets rounded to fp16 like the cache's record,
    the runs are bit-identical: join, replay and the target model are one.  With fp32 online targets they agree
    to the fp16 tolerance of the cache."""
    cfg = lambda mode: config(data, "train.batch_size=25", mode=mode, epochs=2)   # noqa: E731
    initial = _flat(train_mod.prepare(cfg("cached")).student.state_dict())
    runs = {"cached": train_mod.train(cfg("cached"), str(tmp_path / "cached")),
            "online": train_mod.train(cfg("online"), str(tmp_path / "online"))}
    import shared.targets as target_model
    encode = target_model.encode_logits

    def rounded(logits, k, temperatures):       # the stored precision (the cache holds τ = 1 only)
        logp, indices, tail = encode(logits, k, (1.0,))
        return logp.half().float(), indices, tail.half().float()

    monkeypatch.setattr(target_model, "encode_logits", rounded)
    runs["online_fp16"] = train_mod.train(cfg("online"), str(tmp_path / "online_fp16"))
    keys = ("train_loss", "train_ce", "train_kd_conv", "train_kd_inv")
    cached, exact = runs["cached"], runs["online_fp16"]
    assert [[r[k] for k in keys] for r in cached.history] == [[r[k] for k in keys] for r in exact.history]
    assert torch.equal(_flat(cached.model.state_dict()), _flat(exact.model.state_dict()))
    for a, b in zip(cached.history, runs["online"].history):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    w_cached, w_online = _flat(cached.model.state_dict()), _flat(runs["online"].model.state_dict())
    # Adam turns fp16-sized gradient differences into small weight differences (a fraction of a percent)
    ratio = ((w_cached - w_online).norm() / (w_cached - initial).norm()).item()
    assert ratio < 0.02, ratio
    assert not torch.equal(w_cached, w_online) or ratio == 0


def test_online_teacher_must_be_the_cached_one(data, tmp_path):
    other = str(tmp_path / "other.safetensors")
    model = create_model("test_resnet", num_classes=10, in_chans=1, small_input=True)
    model_checkpoint.save_checkpoint(model, other, {"kind": "inv", "mean": [0.4], "std": [0.3]})
    cfg = config(data, f"kd.checkpoints.conv_b={json.dumps(other)}", mode="online")
    _fails_before_training(tmp_path, cfg, CacheError, "is not the teacher 'conv_b' the cache was built with")


# -----------------------------------------------------------------------------------------------------------------
# Teachers train with the same loop

def test_teacher_train_saves_checkpoint_with_test_accuracy(data, tmp_path):
    from trainer.teacher import TeacherSpec, train_teacher
    cfg = train_mod.load_run_config(None, ["augment.ra_magnitude_std=0.0", "data.num_workers=0", "train.epochs=2",
                                           "train.batch_size=32", "train.progress=false"])
    out = str(tmp_path / "t.safetensors")
    result = train_teacher(TeacherSpec("test_resnet", "inv", data["train"], data["test"], out), cfg)
    assert [r["view"] for r in result.history] == [0, 1]            # views = 0: a fresh view every epoch
    assert all(0 <= r["test_acc_cls"] <= 1 and r["test_samples"] == 32 for r in result.history)
    model, meta = model_checkpoint.load_checkpoint(out, expect_classes=10, expect_in_chans=1)
    assert meta.kind == "inv" and meta.arch == "test_resnet" and meta.num_classes == 10
    assert meta.model_kwargs["small_input"] is True                 # default for timm CNNs at 28 px
    assert meta.test_accuracy == result.history[-1]["test_acc_cls"]
    assert meta.mean == list(SPEC.mean) and meta.get("augment")["image_size"] == 28
    from trainer.evaluate import evaluate_checkpoint
    report = evaluate_checkpoint(out, [data["test"]], num_workers=0)
    assert report["sets"]["te"]["acc_cls"] == pytest.approx(meta.test_accuracy)


def test_agreement_eval_reports_heads_teachers_and_kl_per_token(data, tmp_path):
    """``cit eval --teacher``: each head's accuracy, the teachers' accuracy and KL(teacher ‖ head), checked against a
    direct computation over the same evaluation views."""
    from shared.augment import to_model_input
    from shared.manifest import Manifest
    from trainer.data import EvalViews
    from trainer.evaluate import evaluate_agreement, evaluate_checkpoint
    train_mod.train(config(data, epochs=1), str(tmp_path / "run"))
    student_path = str(tmp_path / "run" / "student.safetensors")
    teachers = {n: t["checkpoint"] for n, t in data["teachers"].items()}
    report = evaluate_agreement({"s": student_path}, teachers, [data["test"]], num_workers=0, device="cpu",
                                out=str(tmp_path / "agree.json"))
    r = report["sets"]["te"]
    assert json.loads((tmp_path / "agree.json").read_text())["sets"]["te"] == r
    plain = evaluate_checkpoint(student_path, [data["test"]], num_workers=0)["sets"]["te"]
    assert r["students"]["s"]["acc"]["cls"] == pytest.approx(plain["acc_cls"])
    assert r["students"]["s"]["acc"]["mean"] == pytest.approx(plain["acc_mean"])
    for name, path in teachers.items():
        assert r["teachers"][name] == pytest.approx(evaluate_checkpoint(path, [data["test"]], num_workers=0)
                                                    ["sets"]["te"]["acc_cls"])
    # direct: all views in one batch, KL(teacher || conv head)
    student, _ = model_checkpoint.load_checkpoint(student_path)
    batch = collate(list(EvalViews(Manifest.load(data["test"]), SPEC, 0, 1)))
    with torch.no_grad():
        heads = student.eval().forward_heads(to_model_input(batch.views, SPEC.mean, SPEC.std))
        t = data["teachers"]["conv_a"]
        z_t = t["model"](to_model_input(batch.views, t["mean"], t["std"]))
    assert r["students"]["s"]["kl"]["conv"]["conv_a"] == pytest.approx(kd_kl(heads["conv"], z_t, 1.0).item(), rel=1e-4)
    assert set(r["students"]["s"]["kl"]) == {"cls", "conv", "inv", "mean"}
    with pytest.raises(ValueError, match="not a student with heads"):
        evaluate_agreement({"t": teachers["conv_a"]}, teachers, [data["test"]], num_workers=0, device="cpu")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_agreement({"s": student_path}, teachers, [], num_workers=0, device="cpu")


def test_topk_beyond_the_cache_is_refused(data, tmp_path):
    _fails_before_training(tmp_path, config(data, "loss.topk=11"), ConfigError, "holds only K=10")


def test_report_groups_seeds_into_variants(data, tmp_path):
    from trainer.report import markdown, report
    folders = []
    for seed, (mode, acc) in enumerate([("cached", 0.8), ("cached", 0.9), ("none", 0.5)]):
        cfg = config(data, f"train.seed={seed}", mode=mode).to_dict()
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"config": cfg, "final": {"test_acc_cls": acc,
                                                                               "test_acc_mean": acc + 0.01}}))
        folders.append(str(folder))
    rows = report(folders, out=str(tmp_path / "r.json"))
    assert [len(r["seeds"]) for r in rows] == [2, 1]
    assert rows[0]["acc_cls"]["mean"] == pytest.approx(0.85) and rows[0]["acc_cls"]["std"] == pytest.approx(0.0707, 1e-3)
    assert "no KD" in rows[1]["variant"] and "conv=conv_a inv=conv_b" in rows[0]["variant"]
    assert "85.00 ± 7.07" in markdown(rows)


def test_cli_reports_bad_input_as_an_error_message(data, tmp_path):
    """Through the real `cit` entry point (in this process: nothing here needs a process of its own): a clear
    one-line error and a non-zero exit, no traceback."""
    from click.testing import CliRunner

    from shared.cli import main as cit
    result = CliRunner().invoke(cit, ["train", "--data", data["train"], "--cache", data["cache"], "--conv-teacher",
                                      "resnet", "--out", str(tmp_path / "run"), "--set", f"data.view_seed={VIEW_SEED}",
                                      "--set", "augment.ra_magnitude_std=0.0"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "teacher 'resnet' is not in it" in result.stderr and "Traceback" not in result.stderr
    assert [line.startswith("Error:") for line in result.stderr.splitlines()] == [True], result.stderr
