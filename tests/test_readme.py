"""The README's commands run as printed, and every command has a working ``--help``: a renamed option or command
breaks the suite, not the user.

The only thing the test adds to a README command is options that make the data small (a fake Fashion-MNIST
source, few images per class, one epoch, one view, four after `cache extend`) or the work quick (one process for
`data prepare`); the README's own options come first and are all kept.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from shared.cli import SUBCOMMANDS, main as cit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Appended to the README's command (click: the last value of an option wins) to make it small and fast; prepare also
# gets --source <fake IDX>, and one process (a process pool starts slower than it writes a few images)
SMALL = {
    ("data", "prepare", "fashion-mnist"): ["--per-class", "2", "--severities", "1", "--workers", "1"],
    ("teacher", "train"): ["--epochs", "1"],
    ("cache", "build"): ["--views", "1"],
    ("cache", "extend"): ["--views", "4"],          # as many as the README's `cache export --views 4` needs
    ("cache", "verify"): ["--recompute", "4"],
    ("data", "subset"): ["--per-class", "1"],
    ("train",): ["--epochs", "1"],
}
# Lines of the README's code blocks that are not `cit` commands, and where they are tested instead
ELSEWHERE = {
    "bash .ci/setup": "sets up a machine (this environment is set up already); `cit demo` runs the pipeline below at "
                      "full size, too slow here: its --help is checked with every other command's",
    "python benchmarks/": "tests/test_benchmarks.py runs every benchmark in --quick mode (cross-checked below)",
}


def readme_blocks() -> list[list[str]]:
    """The README's indented code blocks, each as its logical lines (``\\`` continuations joined)."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    blocks, current, previous_blank = [], [], True
    for line in text.splitlines():
        if line.startswith("    ") and (current or previous_blank):
            current.append(line[4:])
        elif current and not line.strip():
            current.append("")
        else:
            if current:
                blocks.append(current)
            current = []
        previous_blank = not line.strip()
    if current:
        blocks.append(current)
    out = []
    for block in blocks:
        logical = re.sub(r"\\\n\s*", " ", "\n".join(block).strip()).splitlines()
        out.append([line for line in logical if line.strip()])
    return out


def readme_commands() -> list[list[str]]:
    return [shlex.split(line, comments=True) for block in readme_blocks() for line in block if line.startswith("cit ")]


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def publish_weights(args: list[str]) -> None:
    """For `cit teacher import`: the file it names, saved the way its publisher saves it (timm: safetensors of the
    state dict; torchvision: ``torch.save`` of the state dict; the involution authors: an mmcls checkpoint with the
    state dict under ``state_dict``), and a small 1000-class manifest for ``--test-data``."""
    import safetensors.torch
    import timm
    import torch
    from tests.shard_fixtures import make_shards
    from tests.test_import import to_mmcls
    arch, weights, source = option(args, "--arch"), option(args, "--weights"), option(args, "--from", "auto")
    os.makedirs(os.path.dirname(weights) or ".", exist_ok=True)
    if source == "torchvision":
        import torchvision
        torch.save(getattr(torchvision.models, arch)().state_dict(), weights)
    elif arch.startswith("rednet"):
        from shared.models import create_model
        state = create_model(arch, num_classes=1000).state_dict()
        torch.save({"meta": {"mmcls_version": "0.12.0"}, "state_dict": {to_mmcls(k): v for k, v in state.items()}},
                   weights)
    else:
        safetensors.torch.save_file(timm.create_model(arch, pretrained=False).state_dict(), weights)
    test = option(args, "--test-data")
    if test and not os.path.exists(test):
        folder = os.path.dirname(test)
        name = os.path.splitext(os.path.basename(test))[0]
        make_shards(folder, num_samples=4, shard_size=4, num_classes=1000, size=32, channels=3, prefix=name)


def small_options(args: list[str], fake_source: str) -> list[str]:
    for prefix, extra in SMALL.items():
        if tuple(args[:len(prefix)]) == prefix:
            return extra + (["--source", fake_source] if prefix[-1] == "fashion-mnist" else [])
    return []


def test_readme_code_blocks_are_all_accounted_for():
    # the layout block is prose in a table; the Python block is run below (exec)
    lines = [line for block in readme_blocks() if not block[0].startswith(("<root>", "import ")) for line in block]
    kinds = [line for line in lines if not line.startswith("cit ")]
    for line in kinds:
        if line.startswith(tuple(ELSEWHERE)) or line.startswith("#"):     # a comment line
            continue
        pytest.fail(f"README code line neither run here nor tested elsewhere: {line!r}")
    assert len(readme_commands()) >= 10


def test_readme_benchmark_commands_are_the_ones_the_benchmark_tests_run():
    from tests.test_benchmarks import QUICK
    quick = {script: extra for script, _, extra in QUICK}
    for line in (line for block in readme_blocks() for line in block if line.startswith("python benchmarks/")):
        args = shlex.split(line, comments=True)
        script = os.path.basename(args[1])
        assert os.path.exists(os.path.join(REPO, "benchmarks", script)), line
        if script == "render.py":
            continue      # tests/test_benchmarks.py: the README section is what render.py makes (--check)
        if script == "bench_imagenet.py":
            assert os.path.exists(os.path.join(REPO, "tests", "test_bench_imagenet.py"))
            continue
        assert script in quick, f"{line!r} is not run by tests/test_benchmarks.py"
        options = [a for a in args[2:] if a.startswith("--") and a != "--out"]
        assert set(options) <= set(quick[script]), f"{line!r}: {options} not exercised by the benchmark test"


def test_every_readme_command_runs_as_printed(fake_fashion_mnist, tmp_path, monkeypatch):
    """The README's commands, in order, in one working directory, each followed only by options that shrink the
    data; then the README's Python snippet on the cache they made."""
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ran = []
    for args in readme_commands():
        args = args[1:]
        if args[:2] == ["teacher", "import"]:
            publish_weights(args)
        expanded = [m for a in args for m in (sorted(glob.glob(a)) if "*" in a else [a])]
        result = CliRunner().invoke(cit, expanded + small_options(args, fake_fashion_mnist.folder))
        assert result.exit_code == 0, f"cit {shlex.join(args)}\n{result.output}"
        ran.append(args[0])
    assert {"data", "teacher", "cache", "train", "eval", "report"} <= set(ran)
    snippet = next(block for block in readme_blocks() if block[0].startswith("import "))
    exec("\n".join(snippet), {})                             # noqa: S102 — the README's own example


def walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), path + (name,))


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_registered_command_loads(name):
    """A command whose module is missing or broken would silently vanish from `cit --help`."""
    assert name in cit.list_commands(click.Context(cit))
    assert isinstance(cit.get_command(click.Context(cit), name), click.Command)


def test_help_of_every_command_and_subcommand():
    paths = list(walk(cit))
    assert len(paths) > 12
    for path, command in paths:
        result = CliRunner().invoke(cit, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, f"cit {' '.join(path)} --help\n{result.output}"
        assert (command.help or command.short_help), f"cit {' '.join(path)} has no help text"


HELP_WITHOUT_TORCH = """
import os
import sys
import click
from click.testing import CliRunner
from shared.cli import main as cit

def walk(command, path=()):
    yield path
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), path + (name,))

for path in walk(cit):
    assert CliRunner().invoke(cit, [*path, "--help"]).exit_code == 0, path

def run(*args):
    result = CliRunner().invoke(cit, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    print(" ".join(args[:2]) + ":", result.output.splitlines()[0 if args[1] != "info" else 1])

root = sys.argv[1]
cache, train = os.path.join(root, "c.zarr"), os.path.join(root, "train", "tr.json")
run("cache", "info", cache)
run("cache", "verify", cache, "--data", train)
run("cache", "export", cache, "--views", "1", "--out", os.path.join(root, "v0.zarr"))
run("cache", "export", cache, "--views-from", "1", "--out", os.path.join(root, "v1.zarr"))
run("cache", "merge", os.path.join(root, "v0.zarr"), os.path.join(root, "v1.zarr"), "--out",
    os.path.join(root, "m.zarr"))
# one process writes the shards here; with --workers N each worker runs the same write_shard
run("data", "prepare", "fashion-mnist", "--source", sys.argv[2], "--out", os.path.join(root, "fm"), "--per-class", "1",
    "--workers", "1")
heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
print("imported:", heavy)
"""


def test_help_and_commands_that_read_or_copy_a_cache_do_not_start_torch(tmp_path, tiny_teachers, fake_fashion_mnist):
    """Every command's ``--help``, ``cache info | verify | export | merge`` on a real cache and ``data prepare``, in
    one fresh interpreter: none imports torch or timm (seconds a user waits for nothing)."""
    from cache_builder.build import build_cache
    from shared.view_spec import ViewSpec
    from tests.cache_fixtures import assert_bit_identical
    from tests.shard_fixtures import make_shards
    make_shards(str(tmp_path / "train"), num_samples=12, shard_size=6, prefix="tr")
    build_cache(str(tmp_path / "train" / "tr.json"), [f"conv={tiny_teachers['conv']}"], str(tmp_path / "c.zarr"),
                views=2, topk=3, spec=ViewSpec(image_size=8), batch_size=8, workers=0, threads=1, progress=False)
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, str(tmp_path), fake_fashion_mnist.folder],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [re.sub(r" in [0-9.]+s;", " in ...;", line) for line in proc.stdout.strip().splitlines()]
    assert lines[-1] == "imported: []", proc.stdout + proc.stderr[-2000:]
    copied = "teachers conv; copied {} units in ...; 0 units were already done"
    assert lines[:-1] == [
        "cache info: status       complete: 4/4 units (view x chunk) written",
        f"cache verify: verify {tmp_path / 'c.zarr'}: OK",
        f"cache export: cache {tmp_path / 'v0.zarr'}: complete; E=1, " + copied.format(2),
        f"cache export: cache {tmp_path / 'v1.zarr'}: complete; views 1..1 (a range), " + copied.format(2),
        f"cache merge: cache {tmp_path / 'm.zarr'}: complete; E=2, " + copied.format(4),
        f"data prepare: {tmp_path / 'fm' / 'train.json'}: 10 samples, 10 classes, 1 shards, "
        + lines[-2].split("shards, ")[-1]], proc.stdout
    assert_bit_identical(str(tmp_path / "c.zarr"), str(tmp_path / "m.zarr"))
