"""FLA's autotuning choices are written to disk (checked on FLA's own kernels), and the trainer keeps Triton's
kernel cache in the run directory unless the user named another one."""

from __future__ import annotations

import os

import pytest

from flame_gin import config as config_lib
from flame_gin import configurables
from flame_gin.kernels import cache


def test_fla_autotuners_write_their_results_to_the_kernel_cache(monkeypatch):
    tuners = cache.gla_autotuners()
    assert len(tuners) >= 5  # FLA's chunked GLA kernels are autotuned (and wrapped in triton.heuristics)
    assert cache.autotuning_persisted() is True
    monkeypatch.setattr(tuners[-1], "cache_results", False)  # as FLA_CACHE_RESULTS=0 at import would leave it
    assert cache.autotuning_persisted() is False


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(cache.DIR_ENV, raising=False)
    monkeypatch.setitem(cache._set_by_us, "dir", None)
    return monkeypatch


def test_the_cache_follows_the_run_directory_unless_the_user_named_one(tmp_path, clean_env):
    first = cache.use_run_dir(workdir=tmp_path / "a")
    assert first == tmp_path / "a" / cache.DIRNAME and first.is_dir()
    assert os.environ[cache.DIR_ENV] == str(first)
    second = cache.use_run_dir(workdir=tmp_path / "b")  # a later run in the same process moves what we set
    assert os.environ[cache.DIR_ENV] == str(second) == str(tmp_path / "b" / cache.DIRNAME)
    clean_env.setenv(cache.DIR_ENV, str(tmp_path / "mine"))
    assert cache.use_run_dir(workdir=tmp_path / "c") == tmp_path / "mine"
    assert os.environ[cache.DIR_ENV] == str(tmp_path / "mine") and not (tmp_path / "c").exists()


def _parse_tiny(workdir, *bindings):
    """Binds the tiny default for a one-step run in ``workdir`` with the given extra bindings."""
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=[f"MODEL_DIR = {str(workdir)!r}", "TRAIN_STEPS = 1", *bindings],
        search_paths=config_lib.default_search_paths(),
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_the_trainer_makes_no_kernel_cache_where_no_triton_kernel_runs(tmp_path, clean_env, enabled):
    """On a CUDA device the trainer points the cache at the run directory (``use_run_dir``, above) before the
    model is built; on a CPU no Triton kernel is compiled, so it makes no folder and sets nothing."""
    workdir = tmp_path / "run"
    _parse_tiny(
        workdir, "WARMUP_STEPS = 0", "flame_gin.evaluation.interval = 0", f"flame_gin.run.kernel_cache = {enabled}"
    )
    assert configurables.run(config_text="", on_first_step=None) == 0
    assert os.environ.get(cache.DIR_ENV) is None
    assert not (workdir / cache.DIRNAME).exists() and (workdir / "checkpoints").is_dir()


def _choice(folder, key, name, text="{}"):
    path = folder / key / f"{name}.autotune.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_new_run_takes_only_the_autotuning_choices_of_an_earlier_one(tmp_path):
    earlier = tmp_path / "earlier"  # a run directory: its kernel_cache/ holds binaries and choices
    _choice(earlier / cache.DIRNAME, "k1", "chunk_gla_fwd_kernel_o", '{"configs_timings": [1]}')
    _choice(earlier / cache.DIRNAME, "k2", "chunk_bwd_kernel_dh", '{"configs_timings": [2]}')
    (earlier / cache.DIRNAME / "k1" / "chunk_gla_fwd_kernel_o.cubin").write_bytes(b"\0" * 1000)
    source = cache.choices_source(path=earlier)
    assert source == earlier / cache.DIRNAME
    new = tmp_path / "new" / cache.DIRNAME
    kept = _choice(new, "k2", "chunk_bwd_kernel_dh", '{"configs_timings": ["its own"]}')
    assert cache.seed_choices(source=source, folder=new) == 1
    assert (new / "k1" / "chunk_gla_fwd_kernel_o.autotune.json").read_text() == '{"configs_timings": [1]}'
    assert kept.read_text() == '{"configs_timings": ["its own"]}'  # a choice the folder has is never replaced
    assert sorted(p.relative_to(new).as_posix() for p in new.rglob("*")) == [
        "k1",
        "k1/chunk_gla_fwd_kernel_o.autotune.json",
        "k2",
        "k2/chunk_bwd_kernel_dh.autotune.json",
    ]  # no binaries, no temporary files
    assert cache.seed_choices(source=source, folder=new) == 0
    assert cache.choices_source(path=new) == new  # a Triton cache folder itself is taken as it is


@pytest.mark.parametrize("made", [False, True])
def test_a_source_without_choices_is_refused_before_anything_is_built(tmp_path, clean_env, made):
    source = tmp_path / "earlier"
    if made:  # a run directory whose kernel cache holds binaries only
        (source / cache.DIRNAME / "k1").mkdir(parents=True)
        (source / cache.DIRNAME / "k1" / "kernel.cubin").write_bytes(b"\0")
    workdir = tmp_path / "run"
    _parse_tiny(workdir, f"flame_gin.run.kernel_choices_from = {str(source)!r}")
    expected = "holds no autotuning choices" if made else "no such folder"
    with pytest.raises(config_lib.ConfigError, match=rf"flame_gin.run.kernel_choices_from='{source}'.*{expected}"):
        configurables.run(config_text="", on_first_step=None)
    assert not workdir.exists()


def test_triton_takes_a_seeded_choice_without_timing_any_candidate(tmp_path, monkeypatch):
    """Triton's own autotuner, reading the disk cache as it does before the first launch of an autotuned kernel
    (`Autotuner.check_disk_cache`): a cold folder times the candidates and writes the choice; a new folder
    seeded by `seed_choices` yields the same choice without timing; an unseeded folder or another GPU
    architecture times again. No GPU here: the driver only names the target (a Hopper card, as on the GPUs the
    choices come from)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, driver

    @triton.jit
    def _double(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)

    configs = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)]
    key = (4096, "torch.float32")
    timed = []

    def lookup(folder, *, arch=90):
        monkeypatch.setenv(cache.DIR_ENV, str(folder))
        monkeypatch.setattr(
            driver, "_active", type("Hopper", (), {"get_current_target": lambda self: GPUTarget("cuda", arch, 32)})()
        )
        tuner = autotuner.Autotuner(_double, _double.arg_names, configs, ["n"], None, None, cache_results=True)

        def bench():  # what timing the candidates leaves behind: the second is faster
            timed.append(str(folder))
            tuner.configs_timings = {configs[0]: [2.0], configs[1]: [1.0]}

        used_disk = tuner.check_disk_cache(key, configs, bench)
        return used_disk, tuner.cache[key] if used_disk else None

    earlier = tmp_path / "earlier"
    assert lookup(earlier / cache.DIRNAME) == (False, None) and len(timed) == 1  # a cold run times them all
    new = tmp_path / "new" / cache.DIRNAME
    assert cache.seed_choices(source=cache.choices_source(path=earlier), folder=new) == 1
    used_disk, choice = lookup(new)
    assert used_disk and len(timed) == 1  # nothing timed
    assert (choice.kwargs, choice.num_warps) == ({"BLOCK": 128}, 8)
    assert lookup(tmp_path / "unseeded")[0] is False and len(timed) == 2
    assert lookup(new, arch=80)[0] is False and len(timed) == 3  # an Ampere card does not take Hopper's choice


@pytest.mark.parametrize("in_run_dir", [True, False])
def test_the_trainers_step_seeds_whichever_folder_triton_uses(tmp_path, clean_env, in_run_dir):
    """`prepare` is what the trainer calls on a GPU before building the model: the choices land in the run
    directory's cache, or, with ``flame_gin.run.kernel_cache = False``, in the folder Triton uses anyway."""
    _choice(tmp_path / "earlier" / cache.DIRNAME, "k1", "chunk_gla_fwd_kernel_o")
    if not in_run_dir:  # Triton's own folder, under TRITON_HOME
        clean_env.setenv("TRITON_HOME", str(tmp_path / "home"))
    choices = cache.choices_source(path=tmp_path / "earlier")
    folder = cache.prepare(workdir=tmp_path / "run", in_run_dir=in_run_dir, choices=choices)
    assert folder == (tmp_path / "run" / cache.DIRNAME if in_run_dir else tmp_path / "home" / ".triton" / "cache")
    assert [p.relative_to(folder).as_posix() for p in folder.rglob("*.json")] == [
        "k1/chunk_gla_fwd_kernel_o.autotune.json"
    ]
    assert cache.prepare(workdir=tmp_path / "run", in_run_dir=in_run_dir, choices=None) == folder
