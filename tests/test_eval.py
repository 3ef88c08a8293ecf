"""Downstream evaluation with lm-evaluation-harness, offline, on a local task (a YAML file over a local jsonl):
during training (``flame_gin.downstream``, every 2 steps of a 4-step tiny run) and by the
``python -m flame_gin.eval`` command on the run's last checkpoint, and the stock ``lm_eval --model hf`` command
on its export (``trust_remote_code=True``: the export carries its loader module). All word perplexities equal a hand
computation with the step-4 model (each document scored from the BOS token, natural log, words split on white
space), the scores land in the run's TensorBoard events at their steps, and training is unchanged by the
evaluations in it (the same final weights as a run without them)."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from flame_gin import kernels
from flame_gin.checkpoint import hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "for i in range(3):\n    print(i * i)\n",
]
TASK = """task: tiny_code_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


def _start(*args: list[str], cwd: pathlib.Path, env: dict[str, str], log: pathlib.Path) -> subprocess.Popen:
    """Starts ``python ARGS...`` (the lists joined) without waiting, its output going to ``log`` (a file, not a
    pipe: a full pipe would stall the process until it is read)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, *(a for part in args for a in part)], cwd=cwd, env=env, stdout=out, stderr=out
        )


@pytest.mark.slow
def test_downstream_during_training_and_the_eval_command_score_as_computed_by_hand(tmp_path, train_tiny, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tasks / "tiny_code_ppl.yaml").write_text(TASK.format(data=data))
    run = train_tiny(
        tmp_path / "run",
        steps=4,
        bindings=(
            "flame_gin.run.downstream = @flame_gin.downstream()",
            "flame_gin.downstream.tasks = ['tiny_code_ppl']",
            f"flame_gin.downstream.include_path = {str(tasks)!r}",
            "flame_gin.downstream.tokenizer = 'embedded'",
            "flame_gin.downstream.interval = 2",
            "flame_gin.downstream.batch_size = 2",
        ),
    )
    during = {s: json.loads((run / "eval" / f"step_{s}.json").read_text()) for s in (2, 4)}
    without = train_tiny(tmp_path / "without", steps=4)

    from transformers import AutoTokenizer

    from flame_gin.data import embedded

    model, step = hf.load_checkpoint_model(checkpoint_dir=run / "checkpoints")
    hf.export_model(model=model, output=tmp_path / "hf", dtype="float32", tokenizer=embedded.tokenizer_path())
    # Both commands run side by side (their time is mostly imports, one core each) while the hand computation runs.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    ours = _start(
        ["-m", "flame_gin.eval", f"--checkpoint_dir={run / 'checkpoints'}", "--tokenizer=embedded"],
        ["--tasks=tiny_code_ppl", f"--include_path={tasks}", "--batch_size=2", f"--output={tmp_path / 'command.json'}"],
        cwd=ROOT,
        env=env,
        log=tmp_path / "command.log",
    )
    # The stock harness command on the step-4 model's export: it never imports FLA or flame_gin itself.
    stock = _start(
        [
            "-m",
            "lm_eval",
            "--model=hf",
            f"--model_args=pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
        ],
        ["--tasks=tiny_code_ppl", f"--include_path={tasks}", "--batch_size=2", "--device=cpu"],
        [f"--output_path={tmp_path / 'stock'}"],
        cwd=tmp_path,
        env=dict(env, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules")),
        log=tmp_path / "stock.log",
    )
    tok = AutoTokenizer.from_pretrained(embedded.tokenizer_path())
    kernels.select(mode="reference")
    try:
        other, _ = hf.load_checkpoint_model(checkpoint_dir=without / "checkpoints")
        total, words = 0.0, 0
        with torch.no_grad():
            for doc in DOCS:
                ids = tok(doc, add_special_tokens=False)["input_ids"]
                inputs = torch.tensor([[tok.bos_token_id] + ids[:-1]])
                logp = torch.log_softmax(model(input_ids=inputs).logits.double(), dim=-1)[0]
                total += float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())
                words += len(re.split(r"\s+", doc))
    finally:
        kernels.restore()
    by_hand = math.exp(-total / words)
    for proc, log in ((ours, "command.log"), (stock, "stock.log")):
        assert proc.wait(timeout=600) == 0, (tmp_path / log).read_text()[-4000:]
    command = json.loads((tmp_path / "command.json").read_text())
    assert command["step"] == 4
    (stock_file,) = (tmp_path / "stock").rglob("results_*.json")
    stock_ppl = json.loads(stock_file.read_text())["results"]["tiny_code_ppl"]["word_perplexity,none"]
    assert stock_ppl == pytest.approx(by_hand, rel=1e-4)
    assert step == 4
    assert command["results"]["tiny_code_ppl"]["word_perplexity,none"] == pytest.approx(by_hand, rel=1e-4)
    assert during[4]["results"]["tiny_code_ppl"]["word_perplexity,none"] == pytest.approx(by_hand, rel=1e-4)
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("downstream/tiny_code_ppl/word_perplexity")]
    assert [s for s, _ in logged] == [2, 4, 4]  # during training at 2 and 4, then the command's
    assert logged[0][1] == pytest.approx(during[2]["results"]["tiny_code_ppl"]["word_perplexity,none"], rel=1e-6)
    assert logged[0][1] != pytest.approx(by_hand, rel=1e-3)  # the step-2 model scored, not the last one
    assert all(v == pytest.approx(by_hand, rel=1e-4) for _, v in logged[1:])
    theirs = other.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_downstream_settings_are_checked_before_anything_is_built(tmp_path):
    from flame_gin import downstream

    ok = downstream.Downstream(tasks=["x"], tokenizer="embedded", include_path=str(tmp_path))
    with pytest.raises(ValueError, match="runs on one process, this run has 2"):
        ok.validate(world_size=2)
    with pytest.raises(ValueError, match="interval=-1"):
        downstream.Downstream(tasks=["x"], tokenizer="embedded", interval=-1).validate(world_size=1)
    with pytest.raises(ValueError, match="tasks is empty"):
        downstream.Downstream(tasks=[], tokenizer="embedded").validate(world_size=1)
    with pytest.raises(ValueError, match="include_path='/nonexistent'"):
        downstream.Downstream(tasks=["x"], tokenizer="embedded", include_path="/nonexistent").validate(world_size=1)
