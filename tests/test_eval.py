"""Downstream evaluation: ``python -m flame_gin.eval`` runs lm-evaluation-harness offline on a local task
(a YAML file over a local jsonl) against the tiny run's checkpoint; its word perplexity equals a hand
computation with the same model (each document scored from the BOS token, natural log, words split on white
space), and the score lands in the run's TensorBoard events at the checkpoint's step."""

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


@pytest.mark.slow
def test_eval_command_scores_a_local_task_as_computed_by_hand(tmp_path, train_tiny):
    pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    train_tiny(run)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tasks / "tiny_code_ppl.yaml").write_text(TASK.format(data=data))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame_gin.eval",
            f"--checkpoint_dir={run / 'checkpoints'}",
            "--tokenizer=embedded",
            "--tasks=tiny_code_ppl",
            f"--include_path={tasks}",
            "--batch_size=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads((run / "eval" / "step_3.json").read_text())
    got = saved["results"]["tiny_code_ppl"]["word_perplexity,none"]

    from transformers import AutoTokenizer

    from flame_gin.data import embedded

    tok = AutoTokenizer.from_pretrained(embedded.tokenizer_path())
    kernels.select(mode="reference")
    try:
        model, step = hf.load_checkpoint_model(checkpoint_dir=run / "checkpoints")
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
    assert step == 3
    assert got == pytest.approx(math.exp(-total / words), rel=1e-4)
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    (event,) = acc.Scalars("downstream/tiny_code_ppl/word_perplexity")
    assert event.step == 3 and event.value == pytest.approx(got, rel=1e-6)
