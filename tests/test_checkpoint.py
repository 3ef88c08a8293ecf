"""Single-process Checkpointer behaviour: round trips, resume, retention, errors."""

import os
import pathlib
import signal

import pytest
import torch

from flame_gin.checkpoint import (
    REQUEUE_EXIT_CODE,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointError,
    PreemptionFlag,
    layout,
    load_weights,
    save_seed_checkpoint,
)


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32, dtype=dtype)
        self.proj = torch.nn.Linear(32, 48, dtype=dtype)
        self.norm = torch.nn.LayerNorm(48, dtype=dtype)
        self.head = torch.nn.Linear(48, 64, bias=False, dtype=dtype)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.proj(self.embed(x)))))


def _train(model, opt, *, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 8), generator=gen)
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def _fresh(dtype=torch.float32, seed=123):
    torch.manual_seed(seed)
    model = Tiny(dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype
        # bitwise: compare raw bits, not values (NaN-safe, -0.0 vs 0.0)
        assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("async_save", [False, True])
def test_exact_resume_bitwise(tmp_path, dtype, async_save):
    # Reference: 6 uninterrupted steps.
    ref, ref_opt = _fresh(dtype)
    _train(ref, ref_opt, steps=3, seed=1)
    _train(ref, ref_opt, steps=3, seed=2)
    # Save after 3 steps, restore into fresh objects, continue 3 steps.
    model, opt = _fresh(dtype)
    _train(model, opt, steps=3, seed=1)
    ckpt = Checkpointer(directory=tmp_path, keep=3, keep_every=None, async_save=async_save)
    extra = {"step": 3, "rng": torch.get_rng_state(), "data": {"pos": 17}}
    assert ckpt.save(step=3, model=model, optimizer=opt, extra=extra, config_text="LR = 0.01\n")
    _train(model, opt, steps=1, seed=99)  # mutate while the save may be in flight
    ckpt.close()
    assert ckpt.last_blocked_seconds >= 0 and ckpt.last_saved_bytes > 0

    fresh, fresh_opt = _fresh(dtype, seed=7)
    got = Checkpointer(directory=tmp_path, keep=3, keep_every=None, async_save=False).restore(
        model=fresh, optimizer=fresh_opt
    )
    assert got["data"] == {"pos": 17} and got["step"] == 3
    assert torch.equal(got["rng"], extra["rng"])
    _train(fresh, fresh_opt, steps=3, seed=2)
    _assert_same_params(ref, fresh)
    assert (tmp_path / "3" / layout.CONFIG_FILE).read_text() == "LR = 0.01\n"


def test_weights_only_and_seed(tmp_path):
    model, _ = _fresh(seed=5)
    save_seed_checkpoint(directory=tmp_path / "seed", model=model, config_text="")
    other, other_opt = _fresh(seed=6)
    assert load_weights(directory=tmp_path / "seed", model=other) == 0
    _assert_same_params(model, other)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        Checkpointer(directory=tmp_path / "seed").restore(model=other, optimizer=other_opt)


def test_retention_latest_and_uncommitted(tmp_path):
    model, opt = _fresh()
    _train(model, opt, steps=1, seed=0)
    ckpt = Checkpointer(directory=tmp_path, keep=2, keep_every=4, async_save=True)
    for step in range(1, 10):
        ckpt.save(step=step, model=model, optimizer=opt, extra={"s": step}, config_text="")
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9] and ckpt.latest_step() == 9
    # Saving an already committed step is a no-op.
    assert not ckpt.save(step=9, model=model, optimizer=opt, extra={}, config_text="")
    ckpt.close()
    # A partial save (no marker / tmp name) is never taken.
    (tmp_path / "12").mkdir()
    (tmp_path / f"13{layout.TMP_SUFFIX}").mkdir()
    again = Checkpointer(directory=tmp_path, keep=2)
    assert again.latest_step() == 9
    assert not (tmp_path / f"13{layout.TMP_SUFFIX}").exists()  # stale tmp cleaned
    assert again.restore(model=model)["s"] == 9
    with pytest.raises(CheckpointError, match="step 5"):
        again.restore(model=model, step=5)


def test_interval(tmp_path):
    model, _ = _fresh()
    ckpt = Checkpointer(directory=tmp_path, interval_steps=3)
    saved = [s for s in range(1, 8) if ckpt.save(step=s, model=model, optimizer=None, extra={}, config_text="")]
    assert saved == [3, 6]
    assert ckpt.save(step=7, model=model, optimizer=None, extra={}, config_text="", force=True)


def test_shape_mismatch_names_array(tmp_path):
    model, _ = _fresh()
    save_seed_checkpoint(directory=tmp_path, model=model)
    wrong = torch.nn.Module()
    wrong.embed = torch.nn.Embedding(65, 32)
    with pytest.raises(CheckpointError, match=r"'embed.weight' has shape \(64, 32\)"):
        load_weights(directory=tmp_path, model=wrong)


def _data_files(item: pathlib.Path):
    return sorted(p for p in item.rglob("d/*") if p.is_file())


def _save_encoded(ckpt, step):
    """Save a model whose weights encode `step`; returns the model."""
    model, _ = _fresh()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step)).add_(torch.arange(p.numel()).reshape(p.shape) * 1e-3)
    ckpt.save(step=step, model=model, optimizer=None, extra={"s": step}, config_text="")
    return model


def _flip_bit_in(item: pathlib.Path, values: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of `values` (found in the item's data files)."""
    needle = values.detach().contiguous().view(torch.uint8).numpy().tobytes()[64:128]
    for f in _data_files(item):
        data = bytearray(f.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at + 5] ^= 0x04
            f.write_bytes(bytes(data))
            return
    raise AssertionError(f"bytes of the array not found under {item}")


@pytest.mark.parametrize("damage", ["truncate", "delete", "bit_flip", "no_extra"])
def test_damaged_latest_is_moved_aside_and_the_previous_restored(tmp_path, damage, caplog):
    ckpt = Checkpointer(directory=tmp_path)
    first = _save_encoded(ckpt, 1)
    second = _save_encoded(ckpt, 2)
    item = tmp_path / "2" / "model"
    if damage == "bit_flip":  # same size, same files: only the chunk checksum can tell
        _flip_bit_in(item, second.head.weight)
    elif damage == "no_extra":
        (tmp_path / "2" / layout.EXTRA_FILE).unlink()
    for f in _data_files(item / "ocdbt.process_0") if damage in ("truncate", "delete") else []:
        if damage == "truncate":
            os.truncate(f, max(0, f.stat().st_size // 3))
        else:
            f.unlink()
    target, _ = _fresh(seed=9)
    with pytest.raises(CheckpointCorruptError, match=r"step 2: .*fallback_to_previous=True"):
        Checkpointer(directory=tmp_path, fallback_to_previous=False).restore(model=target)
    assert layout.committed_steps(tmp_path) == [1, 2]  # refusing touches nothing
    with caplog.at_level("WARNING"):
        extra = Checkpointer(directory=tmp_path).restore(model=target)
    assert extra == {"s": 1}
    _assert_same_params(first, target)
    assert layout.committed_steps(tmp_path) == [1]
    moved = tmp_path / f"2{layout.DAMAGED_SUFFIX}"
    assert (moved / "DAMAGED.txt").read_text().startswith("checkpoint step 2")
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
        f"checkpoint step 2 is damaged ({(moved / 'DAMAGED.txt').read_text().strip()}); "
        f"moved to {moved.name}; resuming from step 1"
    ]


def test_after_a_fallback_later_saves_commit_and_the_next_resume_takes_them(tmp_path):
    """Damaged step 3 -> resume at 2; the job saves 3 and 4 again, is killed (no close); the next start
    resumes 4, not a fallback again, and retention never deletes the damaged copy."""
    ckpt = Checkpointer(directory=tmp_path, keep=2)
    for step in (1, 2, 3):
        _save_encoded(ckpt, step)
    (tmp_path / "3" / layout.EXTRA_FILE).write_bytes(b"not a pickle")
    target, _ = _fresh(seed=9)
    resumed = Checkpointer(directory=tmp_path, keep=2)
    assert resumed.restore(model=target) == {"s": 2}
    _save_encoded(resumed, 3)
    fourth = _save_encoded(resumed, 4)
    assert layout.committed_steps(tmp_path) == [3, 4]
    assert Checkpointer(directory=tmp_path, keep=2).restore(model=target) == {"s": 4}
    _assert_same_params(fourth, target)
    assert (tmp_path / f"3{layout.DAMAGED_SUFFIX}" / "DAMAGED.txt").is_file()


def test_every_checkpoint_damaged_stops_with_the_oldest_in_place(tmp_path):
    ckpt = Checkpointer(directory=tmp_path)
    _save_encoded(ckpt, 1)
    (tmp_path / "1" / layout.EXTRA_FILE).unlink()
    with pytest.raises(CheckpointCorruptError, match=r"no older committed checkpoint to fall back to; move .*/1 away"):
        Checkpointer(directory=tmp_path).restore(model=_fresh()[0])
    assert layout.committed_steps(tmp_path) == [1]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(directory=tmp_path, keep=0)
    with pytest.raises(ValueError, match="compression='lz9'"):
        Checkpointer(directory=tmp_path, compression="lz9")
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        Checkpointer(directory=tmp_path).restore(model=Tiny())


def test_zstd_round_trip(tmp_path):
    model, _ = _fresh(torch.bfloat16)
    ckpt = Checkpointer(directory=tmp_path, compression="zstd")
    ckpt.save(step=1, model=model, optimizer=None, extra={}, config_text="")
    other, _ = _fresh(torch.bfloat16, seed=3)
    ckpt.restore(model=other)
    _assert_same_params(model, other)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_preemption_flag(sig):
    before = signal.getsignal(sig)
    with PreemptionFlag() as flag:
        assert not flag.requested()
        os.kill(os.getpid(), sig)
        assert flag.requested() and flag.signal_name == signal.Signals(sig).name
    assert signal.getsignal(sig) is before
    assert REQUEUE_EXIT_CODE == 42


def test_a_step_damaged_twice_keeps_both_copies_aside(tmp_path):
    """Step 3 damaged, saved again and damaged again: the second copy gets the next free name, the first stays."""
    first = layout.damaged_dir(root=tmp_path, step=3)
    assert first == tmp_path / f"3{layout.DAMAGED_SUFFIX}"
    first.mkdir()
    second = layout.damaged_dir(root=tmp_path, step=3)
    assert second == tmp_path / f"3{layout.DAMAGED_SUFFIX}2"
    second.mkdir()
    assert layout.damaged_dir(root=tmp_path, step=3).name == f"3{layout.DAMAGED_SUFFIX}3"
    assert layout.committed_steps(tmp_path) == []


@pytest.mark.parametrize("room", ["fits", "short"])
def test_an_async_save_without_host_room_for_its_copies_is_written_before_save_returns(
    tmp_path, monkeypatch, caplog, room
):
    """Host-resident tensors (all of them here, as under FSDP's CPU offload) are copied for an asynchronous
    save only when the copies fit: 3 float32 arrays per parameter (weights, two AdamW moments) plus each
    parameter's float32 step count, against four fifths of the host's available memory (swap not counted)."""
    import threading

    from flame_gin.checkpoint import writer

    model, opt = _fresh()
    _train(model, opt, steps=2, seed=1)
    params = list(model.parameters())
    need = 3 * 4 * sum(p.numel() for p in params) + 4 * len(params)
    available = need / 0.8 + (64 if room == "fits" else -64)
    monkeypatch.setattr(writer, "host_room", lambda: available)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    release = threading.Event()
    real_write = writer.write_process_db

    def held_write(**kwargs):  # an asynchronous write cannot finish before the test lets it
        if threading.current_thread() is not threading.main_thread():
            assert release.wait(timeout=60)
        return real_write(**kwargs)

    monkeypatch.setattr(writer, "write_process_db", held_write)
    ckpt = Checkpointer(directory=tmp_path, async_save=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.save(step=2, model=model, optimizer=opt, extra={"s": 2}, config_text="")
    _train(model, opt, steps=1, seed=9)  # training goes on after save returns
    assert ckpt.latest_step() == (None if room == "fits" else 2)
    assert ("written synchronously" in caplog.text) == (room == "short")
    release.set()
    ckpt.close()
    fresh, _ = _fresh(seed=7)
    Checkpointer(directory=tmp_path).restore(model=fresh)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
