"""Shared fixtures that make *small* datasets on the fly: fake Fashion-MNIST IDX files, an ImageFolder tree, shards."""
from __future__ import annotations

import gzip
import io
import os
import sys
import tarfile
from dataclasses import dataclass

# One BLAS/OpenMP thread per process, inherited by the CLI subprocesses: the suite runs one pytest worker per core,
# and two workers each starting a multi-threaded torch would fight over the same cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

from shared.shards import ShardWriter, encode_png


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core this process may use (not per hardware thread of the host), at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still runs by default; "
                                       "deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def fresh_s3_filesystems():
    """fsspec caches a filesystem per set of arguments; an S3 one keeps the endpoint (from the environment) of the
    test that made it, so a later test with its own S3 server would talk to a stopped one.  Forget them after each
    test (only when s3fs was imported at all)."""
    yield
    if "s3fs" in sys.modules:
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx(path: str, array: np.ndarray) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(idx_bytes(array))


def fake_images(n: int, labels: np.ndarray, seed: int, size: int = 28) -> np.ndarray:
    """Non-constant images with a class-dependent bright bar, so corruptions always have something to move."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 4 + 2 * int(label) % (size - 8):, 6:10] = 200 + label
    return images


@dataclass
class FakeIDX:
    folder: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def make_fake_fashion_mnist(folder: str, train: int = 200, test: int = 50, seed: int = 0) -> FakeIDX:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.arange(train) % 10).astype(np.uint8)
    test_labels = rng.permutation(np.arange(test) % 10).astype(np.uint8)
    fake = FakeIDX(folder, fake_images(train, train_labels, seed + 1), train_labels,
                   fake_images(test, test_labels, seed + 2), test_labels)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), fake.train_images)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), fake.train_labels)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), fake.test_images)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), fake.test_labels)
    return fake


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory) -> FakeIDX:
    """200 train (20 per class) + 50 test images in the four standard *-ubyte.gz files.  Read-only: copy it to
    modify it."""
    return make_fake_fashion_mnist(str(tmp_path_factory.mktemp("fake-fmnist")))


@pytest.fixture
def image_folder_tree(tmp_path) -> str:
    """root/<class>/... with 3 classes × 6 images of mixed formats (PNG grey, JPEG RGB, BMP), a nested folder,
    names that sanitise to the same key (``a.b.png`` / ``a_b.png``), and an ignored text file."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fish"]):
        (root / name / "nested").mkdir(parents=True)
        for i in range(6):
            rgb = rng.integers(0, 256, (20 + c, 24, 3), dtype=np.uint8)
            path = root / name / ("nested" if i == 5 else "") / f"img {i}"
            if i % 3 == 0:
                Image.fromarray(rgb[:, :, 0]).save(f"{path}.png")
            elif i % 3 == 1:
                Image.fromarray(rgb).save(f"{path}.jpg", quality=90)
            else:
                Image.fromarray(rgb).save(f"{path}.bmp")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / "a.b.png")
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name / "a_b.png")
        (root / name / "notes.txt").write_text("not an image")
    return str(root)


def write_samples(path: str, samples: list[dict]) -> str:
    """A tar shard written member by member, bypassing ShardWriter's checks (to make *bad* shards)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(key: str, label: int, seed: int = 0) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
    return {"__key__": key, "png": encode_png(image), "cls": str(label).encode()}


@pytest.fixture
def small_shards(tmp_path) -> list[str]:
    """Three shards of 8 valid samples each (classes 0..3), as third-party shards to be scanned."""
    folder = tmp_path / "third-party"
    folder.mkdir()
    with ShardWriter(str(folder / "part-%03d.tar"), 8) as writer:
        for i in range(24):
            writer.write(good_sample(f"img_{i:04d}", i % 4, seed=i))
    return [w.path for w in writer.written]


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, str]:
    """Two tiny untrained RedNet teachers saved as real checkpoints, built once per session: ``conv`` (the conv
    twin, seed 1) and ``inv`` (involutions, seed 2), 10 classes, 1 channel, mean/std 0.5.  Read-only: every test
    that needs "some conv + inv teacher" can share them."""
    from tests.cache_fixtures import make_teacher
    root = tmp_path_factory.mktemp("tiny-teachers")
    return {"conv": make_teacher(str(root / "conv.safetensors"), "conv", seed=1),
            "inv": make_teacher(str(root / "inv.safetensors"), "inv", seed=2)}


# Tests that take long (seconds, call + setup, measured with pytest --durations on 2 cores with little other load):
# they start first, dealt to the least loaded worker, so no core idles at the end behind a single long test.  A
# parametrized test's key is its name (every case) or its node id (one case).  A test marked ``slow`` and not listed
# counts as 5 s.
LONG_TESTS = {
    "tests/test_demo.py::test_demo_tells_the_story_and_reuses_its_work": 37,
    "tests/test_readme.py::test_every_readme_command_runs_as_printed": 28,
    "tests/test_cache.py::test_kill_9_and_resume_is_bit_identical": 5,
    "tests/test_cache.py::test_torchrun_two_processes_equal_one": 11,
    "tests/test_cache.py::test_s3_round_trip": 7,
    "tests/test_train.py::test_kill_mid_epoch_then_resume_equals_uninterrupted": 9,
    "tests/test_train.py::test_torchrun_two_ranks_see_every_sample_once_per_epoch": 13,
    "tests/test_train.py::test_cached_and_online_kd_agree": 2.5,
    "tests/test_grow.py::test_extend_add_teacher_export_and_merge_on_s3": 10.5,
    "tests/test_grow.py::test_an_s3_lease_is_a_conditional_put": 1,
    "tests/test_grow.py::test_extend_under_torchrun_equals_one_process": 11.5,
    "tests/test_grow.py::test_kill_9_during_extend_then_rerun_is_identical_and_readers_see_the_old_cache": 2,
    "tests/test_grow.py::test_kill_9_during_add_teacher_then_rerun_is_identical": 2.8,
    "tests/test_grow.py::test_kill_9_during_merge_and_export_then_rerun_is_identical[merge]": 3.5,
    "tests/test_grow.py::test_kill_9_during_merge_and_export_then_rerun_is_identical[export]": 1.2,
    "tests/test_grow.py::test_many_readers_during_extend_and_add_teacher_read_the_old_or_the_new_complete_cache": 5,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads": 2.5,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[train]": 16,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[train_join]": 8,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[claims]": 10,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[cache]": 6,
    "tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[loader]": 1,
    "tests/test_bench_imagenet.py::test_bench_imagenet_quick": 2.5,
    "tests/test_exact_views.py::test_edited_shard_is_refused_by_train_and_found_by_verify": 0.6,
    "tests/test_exact_views.py::test_cache_built_under_one_capability_trains_under_another": 5.5,
    "tests/test_exact_views.py::test_golden_views_identical_under_every_cpu_capability": 2.3,
    "tests/test_data.py::test_real_fashion_mnist": 5,
    "tests/test_reader.py::test_torchrun_two_processes_split_rows": 6.5,
    "tests/test_errors.py::test_endpoint_lost_mid_build_is_one_line_that_says_rerun": 3,
    "tests/test_errors.py::test_missing_bucket_is_found_before_anything_is_written": 1.2,
}


# Long tests that share an expensive module fixture go to the same worker (a module fixture is built once per worker
# that runs one of its tests): the accuracy benchmarks reuse the data and teachers bench_claims trains; the others
# share a built cache (or an S3 server).
TOGETHER = [
    tuple(f"tests/test_benchmarks.py::test_quick_mode_writes_what_the_readme_reads[{name}]"
          for name in ("claims", "mixing", "families", "recipes")),
    ("tests/test_exact_views.py::test_cache_built_under_one_capability_trains_under_another",
     "tests/test_exact_views.py::test_edited_shard_is_refused_by_train_and_found_by_verify"),
    ("tests/test_grow.py::test_kill_9_during_merge_and_export_then_rerun_is_identical[merge]",
     "tests/test_grow.py::test_kill_9_during_merge_and_export_then_rerun_is_identical[export]",
     "tests/test_grow.py::test_kill_9_during_extend_then_rerun_is_identical_and_readers_see_the_old_cache",
     "tests/test_grow.py::test_kill_9_during_add_teacher_then_rerun_is_identical"),
    ("tests/test_cache.py::test_kill_9_and_resume_is_bit_identical",
     "tests/test_cache.py::test_torchrun_two_processes_equal_one", "tests/test_cache.py::test_s3_round_trip"),
    ("tests/test_train.py::test_kill_mid_epoch_then_resume_equals_uninterrupted",
     "tests/test_train.py::test_torchrun_two_ranks_see_every_sample_once_per_epoch"),
    ("tests/test_grow.py::test_extend_add_teacher_export_and_merge_on_s3",
     "tests/test_grow.py::test_an_s3_lease_is_a_conditional_put"),
]
SHORT_SECONDS = 0.3     # a test not listed above, for balancing


def expected_seconds(item: pytest.Item) -> float:
    default = 5.0 if item.get_closest_marker("slow") else 0.0
    return LONG_TESTS.get(item.nodeid, LONG_TESTS.get(item.nodeid.split("[")[0], default))


def worker_shares(n: int, workers: int) -> list[int]:
    """How many tests ``--dist worksteal`` first hands to each worker: contiguous runs, ``len(pending) //
    workers_left`` each (it then steals from the *end* of a busy worker's run)."""
    shares = []
    for left in range(workers, 0, -1):
        shares.append(n // left)
        n -= shares[-1]
    return shares


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist: each worker's first run of tests begins with long tests (longest first, dealt to the least
    loaded worker), then short ones.  The same order on every worker (xdist requires it)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or len(items) < 2 * workers:
        return
    group = {nodeid: n for n, ids in enumerate(TOGETHER) for nodeid in ids}
    units: dict[object, list[pytest.Item]] = {}
    for item in items:
        if expected_seconds(item) > 0:
            units.setdefault(group.get(item.nodeid, item.nodeid), []).append(item)
    long = sorted(units.values(), key=lambda unit: -sum(map(expected_seconds, unit)))
    shares = worker_shares(len(items), workers)
    bins: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for unit in long:
        free = [w for w in range(workers) if len(bins[w]) + len(unit) <= shares[w]]
        w = min(free, key=lambda w: load[w])
        bins[w] += unit
        load[w] += sum(map(expected_seconds, unit))
    # Short tests module by module: to the worker that already runs the module's long tests (its module fixtures
    # are built there anyway), else to the least loaded one; split only where a worker's share is full.
    short: dict[str, list[pytest.Item]] = {}
    for i in items:
        if expected_seconds(i) == 0:
            short.setdefault(module_of(i), []).append(i)
    seconds: dict[tuple[str, int], float] = {}
    for w in range(workers):
        for i in bins[w]:
            seconds[module_of(i), w] = seconds.get((module_of(i), w), 0.0) + expected_seconds(i)
    home = {m: w for (m, w), t in sorted(seconds.items(), key=lambda kv: kv[1])}    # most of its long tests
    for module in sorted(short, key=lambda m: m not in home):
        tests = short[module]
        while tests:
            room = [w for w in range(workers) if len(bins[w]) < shares[w]]
            w = home[module] if home.get(module) in room else min(room, key=lambda w: load[w])
            take = tests[:shares[w] - len(bins[w])]
            bins[w] += take
            load[w] += SHORT_SECONDS * len(take)
            tests = tests[len(take):]
    items[:] = [i for b in bins for i in modules_together(b, items)]


def modules_together(run: list[pytest.Item], order: list[pytest.Item]) -> list[pytest.Item]:
    """One worker's run with each module's tests contiguous (pytest tears a module's fixtures down when the next
    test is from another module, and would build them again): modules with the longest test first; inside a module
    its long tests first, then file order."""
    position = {id(i): n for n, i in enumerate(order)}
    longest: dict[str, float] = {}
    for i in run:
        longest[module_of(i)] = max(longest.get(module_of(i), 0.0), expected_seconds(i))
    first_seen = {m: n for n, m in reversed(list(enumerate(module_of(i) for i in run)))}
    return sorted(run, key=lambda i: (-longest[module_of(i)], first_seen[module_of(i)], -expected_seconds(i),
                                      position[id(i)]))


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]
