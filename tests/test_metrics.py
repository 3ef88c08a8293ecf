"""CLU writers: TensorBoard event files read back with TensorBoard's own reader; non-primary writes nothing."""

import pytest
from tensorboard.backend.event_processing import event_accumulator

from flame_gin import metrics


def test_tensorboard_events_read_back(tmp_path):
    writer = metrics.create_writers(workdir=tmp_path, is_primary=True, asynchronous=True)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 10.0 / step, "lr": 0.1 * step})
    writer.write_texts(3, {"config": "run.train_steps = 3"})
    writer.flush()
    writer.close()
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([10.0, 5.0, 10.0 / 3])
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.1, 0.2, 0.3])
    assert any("config" in tag for tag in acc.Tags()["tensors"])


def test_non_primary_writes_nothing(tmp_path):
    writer = metrics.create_writers(workdir=tmp_path, is_primary=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not any(tmp_path.iterdir())


def test_progress_line():
    line = metrics.format_progress(
        step=10, total_steps=100, scalars={"loss": 2.5, "tokens_per_second": 12345.6}, eta_seconds=3725
    )
    assert line == "step 10/100 | loss 2.5000 | 12,346 tok/s | eta 1:02:05"


@pytest.mark.slow
def test_trainer_writes_config_text_and_hparams_into_the_runs_own_events(tmp_path):
    from flame_gin import config as config_lib
    from flame_gin import configurables

    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=[
            f"MODEL_DIR = {str(tmp_path)!r}",
            "TRAIN_STEPS = 1",
            "WARMUP_STEPS = 0",
            "flame_gin.evaluation.interval = 0",
            "flame_gin.run.checkpointer = None",
        ],
        search_paths=config_lib.default_search_paths(),
    )
    text = config_lib.config_text()
    assert configurables.run(config_text=text, on_first_step=None) == 0
    board = tmp_path / "tensorboard"
    assert [p for p in board.iterdir() if p.is_dir()] == []  # one run: no timestamped hparams run beside it
    acc = event_accumulator.EventAccumulator(str(board), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "config/text_summary" in tags
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in content
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["family"].string_value == "gla" and start.hparams["train_steps"].number_value == 1
    (event,) = acc.Tensors("config/text_summary")
    assert event.tensor_proto.string_val[0].decode() == text  # the resolved config, whole
    assert [e.step for e in acc.Scalars("loss")] == [1]
