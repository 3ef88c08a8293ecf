"""Gin plumbing: shorthand rewrite, search paths, errors that name file and line, config files written."""

import pytest

import gin
from flame_gin import config as config_lib
from flame_gin import configurables  # noqa: F401  (registers configurables)


def test_shorthand_rewrite_keeps_other_flags():
    argv = ["prog", "--gin.TRAIN_STEPS=20", "--gin.LR=3e-4", "--workdir=x", "--gin.flame_gin.run.seed=1"]
    assert config_lib.rewrite_shorthand(argv) == [
        "prog",
        "--gin_bindings=TRAIN_STEPS = 20",
        "--gin_bindings=LR = 3e-4",
        "--workdir=x",
        "--gin_bindings=flame_gin.run.seed = 1",
    ]


def test_shorthand_without_value_is_an_error():
    with pytest.raises(config_lib.ConfigError, match="--gin.TRAIN_STEPS"):
        config_lib.rewrite_shorthand(["prog", "--gin.TRAIN_STEPS"])


def test_later_files_and_bindings_override(tmp_path):
    (tmp_path / "a.gin").write_text("flame_gin.run.seed = 1\nflame_gin.adamw.lr = 0.1\n")
    (tmp_path / "b.gin").write_text("flame_gin.run.seed = 2\n")
    config_lib.parse(
        gin_files=["a.gin", "b.gin"], gin_bindings=["flame_gin.adamw.lr = 0.5"], search_paths=[str(tmp_path)]
    )
    assert gin.query_parameter("flame_gin.run.seed") == 2
    assert gin.query_parameter("flame_gin.adamw.lr") == 0.5


def test_unknown_parameter_names_file_and_line(tmp_path):
    (tmp_path / "bad.gin").write_text("flame_gin.run.seed = 1\nflame_gin.run.sede = 2\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.parse(gin_files=["bad.gin"], gin_bindings=[], search_paths=[str(tmp_path)])
    assert "sede" in str(e.value) and "bad.gin" in str(e.value) and "line 2" in str(e.value)


def test_unknown_configurable_names_the_including_file(tmp_path):
    (tmp_path / "inner.gin").write_text("\n\nno_such_thing.x = 1\n")
    (tmp_path / "outer.gin").write_text("include 'inner.gin'\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.parse(gin_files=["outer.gin"], gin_bindings=[], search_paths=[str(tmp_path)])
    msg = str(e.value)
    assert "no_such_thing" in msg and "inner.gin" in msg and "line 3" in msg and "outer.gin" in msg


def test_missing_file_lists_search_paths(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="nope.gin.*not found"):
        config_lib.parse(gin_files=["nope.gin"], gin_bindings=[], search_paths=[str(tmp_path)])


def test_unset_required_macro_is_named():
    with pytest.raises(config_lib.ConfigError, match="TRAIN_STEPS"):
        config_lib.parse(
            gin_files=["gin/base.gin"],
            gin_bindings=["MODEL_DIR = '/x'", "BATCH_SIZE = 1", "SEQ_LEN = 8", "LR = 0.1"],
            search_paths=config_lib.default_search_paths(),
        )


def test_config_text_is_reparseable(tmp_path):
    config_lib.parse(
        gin_files=["gin/base.gin"],
        gin_bindings=["MODEL_DIR = '/x'", "TRAIN_STEPS = 3", "BATCH_SIZE = 1", "SEQ_LEN = 8", "LR = 0.1"],
        search_paths=config_lib.default_search_paths(),
    )
    text = config_lib.config_text()
    path = config_lib.write_config(workdir=tmp_path, text=text)
    config_lib.parse(gin_files=[str(path)], gin_bindings=[], search_paths=[str(tmp_path)])
    assert gin.query_parameter("%TRAIN_STEPS") == 3
    assert gin.query_parameter("flame_gin.lr_schedule.name") == "cosine"
    assert config_lib.config_text() == text


def test_bound_value_resolves_macros_and_falls_back_only_when_unbound():
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=["MODEL_DIR = '/tmp/x'", "SEQ_LEN = 48"],
        search_paths=config_lib.default_search_paths(),
    )
    assert config_lib.bound_value("flame_gin.run.seq_len") == 48  # bound through the SEQ_LEN macro
    assert config_lib.bound_value("flame_gin.start.restore_step", default="unset") == "unset"
    with pytest.raises(ValueError):
        config_lib.bound_value("flame_gin.start.restore_step")


def test_includes_found_on_a_later_search_path_log_no_error(caplog, tmp_path):
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=["MODEL_DIR = '/tmp/x'"],
        search_paths=config_lib.default_search_paths(),
    )  # tiny.gin includes base.gin from gin/
    assert not [r for r in caplog.records if "Path not found" in r.getMessage()]
    (tmp_path / "broken.gin").write_text("include 'no_such_file.gin'\n")
    with pytest.raises(config_lib.ConfigError, match="no_such_file.gin"):  # a real miss still fails, named
        config_lib.parse(
            gin_files=[str(tmp_path / "broken.gin")], gin_bindings=[], search_paths=config_lib.default_search_paths()
        )


def _parse_text(tmp_path, text: str) -> None:
    (tmp_path / "x.gin").write_text(text)
    config_lib.parse(gin_files=[str(tmp_path / "x.gin")], gin_bindings=[], search_paths=[])


def test_bindings_no_call_from_the_run_reaches_are_named(tmp_path, caplog):
    """A binding applies only when gin calls its configurable; one that nothing the run calls refers to (directly,
    in a list or dict, or through a macro) would change nothing, and is named with the reference it lacks."""
    _parse_text(
        tmp_path,
        "OPT = @flame_gin.adamw()\n"
        "flame_gin.run.optimizer = %OPT\n"
        "flame_gin.adamw.lr = 1e-3\n"  # reached through a macro
        "flame_gin.run.writers = @flame_gin.metric_writers\n"
        "flame_gin.metric_writers.extra = [@flame_gin.wandb_writer]\n"  # reached through a list
        "flame_gin.wandb_writer.project = 'p'\n"
        "flame_gin.run.model_config = {'a': @flame_gin.model_config}\n"  # reached through a dict
        "flame_gin.model_config.family = 'gla'\n"
        "UNUSED_MACRO = 3\n"  # macros are not reported
        "flame_gin.parallelize.cpu_offload = True\n"  # nothing refers to @flame_gin.parallelize
        "flame_gin.profiler.interval = 2\n",  # nor to @flame_gin.profiler
    )
    expected = ["flame_gin.parallelize.cpu_offload", "flame_gin.profiler.interval"]
    assert config_lib.unreached_bindings(root="flame_gin.run") == expected
    # Typed on the command line (full or short selector): refused, naming the binding and the missing reference.
    for typed in (["flame_gin.parallelize.cpu_offload = True"], ["x = 1\nparallelize.cpu_offload=True"]):
        with pytest.raises(config_lib.ConfigError) as err:
            config_lib.check_bindings_reached(root="flame_gin.run", command_line=typed)
        text = str(err.value)
        assert "never applies: flame_gin.parallelize.cpu_offload." in text and "profiler" not in text
        assert "refers to @flame_gin.parallelize:" in text
        assert "flame_gin.run.parallelize = @flame_gin.parallelize" in text
    # Set in files only: a warning (the command line may have turned that part off on purpose), not a refusal.
    caplog.clear()
    with caplog.at_level("WARNING"):
        config_lib.check_bindings_reached(root="flame_gin.run", command_line=["flame_gin.run.seed = 3"])
    (warning,) = [r.getMessage() for r in caplog.records if "never applies" in r.getMessage()]
    assert warning.endswith("@flame_gin.parallelize, @flame_gin.profiler): " + ", ".join(expected))
    # Referring to them applies them: nothing left to report.
    caplog.clear()
    _parse_text(
        tmp_path,
        "flame_gin.run.parallelize = @flame_gin.parallelize\nflame_gin.parallelize.cpu_offload = True\n"
        "flame_gin.run.profiler = @flame_gin.profiler\nflame_gin.profiler.interval = 2\n",
    )
    config_lib.check_bindings_reached(root="flame_gin.run", command_line=["flame_gin.parallelize.cpu_offload=True"])
    assert not caplog.records


def test_a_part_turned_off_on_the_command_line_leaves_its_file_bindings_with_a_warning(caplog):
    """The family sweep's ``flame_gin.run.checkpointer = None`` over pretrain.gin: the file's checkpointer
    bindings are unused on purpose, so the run goes on."""
    off = ["MODEL_DIR = '/tmp/unused'", "flame_gin.run.checkpointer = None"]
    config_lib.parse(gin_files=["gin/gla.gin"], gin_bindings=off, search_paths=config_lib.default_search_paths())
    with caplog.at_level("WARNING"):
        config_lib.check_bindings_reached(root="flame_gin.run", command_line=off)
    assert "@flame_gin.checkpointer): flame_gin.checkpointer.async_save" in caplog.text


def test_bound_keyword_reads_a_partial_or_the_configurables_gin_binding():
    import functools

    config_lib.parse(
        gin_files=["gin/tiny.gin", "gin/parallel/fsdp_one_gpu.gin"],
        gin_bindings=["MODEL_DIR = '/tmp/x'", "flame_gin.parallelize.cpu_offload = True"],
        search_paths=config_lib.default_search_paths(),
    )
    parallelize = config_lib.bound_value("flame_gin.run.parallelize").scoped_configurable_fn  # what the run gets
    assert config_lib.bound_keyword(parallelize, "cpu_offload", False) is True
    assert config_lib.bound_keyword(parallelize, "compile", "unbound") == "unbound"
    assert config_lib.bound_keyword(functools.partial(parallelize, cpu_offload=False), "cpu_offload") is False
    assert config_lib.bound_keyword(lambda **_: None, "cpu_offload", False) is False
    assert config_lib.bound_keyword(None, "cpu_offload", False) is False


@pytest.mark.parametrize("offload", [True, False])
def test_the_offload_binding_reaches_the_process_group_before_it_exists(monkeypatch, offload):
    """FSDP's CPU offload is bound on parallelize, which runs long after the process group is made; the group
    must carry host tensors from the start (clipping all-reduces the host gradients' norm)."""
    from flame_gin import process

    config_lib.parse(
        gin_files=["gin/tiny.gin", "gin/parallel/fsdp_one_gpu.gin"],
        gin_bindings=["MODEL_DIR = '/tmp/x'", f"flame_gin.parallelize.cpu_offload = {offload}"],
        search_paths=config_lib.default_search_paths(),
    )
    seen = {}

    class Stop(Exception):
        pass

    def init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(process, "init", init)
    with pytest.raises(Stop):
        configurables.run(config_text="")
    assert seen["host_collectives"] is offload
    assert process.backend(device_type="cuda", host_collectives=seen["host_collectives"]) == (
        "cuda:nccl,cpu:gloo" if offload else "nccl"
    )
    assert process.backend(device_type="cpu", host_collectives=seen["host_collectives"]) == "gloo"
