"""End-to-end training: resume exactness after SIGKILL, bad steps, bad input, outputs on disk."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from moeforge.cli import main
from moeforge.config import get_preset
from moeforge.data import DataConfig
from moeforge.train.config import TrainConfig
from moeforge.train.trainer import Trainer, TrainingAborted

SMALL = ["vocab_size=512", "hidden_size=64", "intermediate_size=96", "moe.moe_intermediate_size=32",
         "attention.q_lora_rank=32", "attention.kv_lora_rank=32", "attention.qk_nope_head_dim=16",
         "attention.qk_rope_head_dim=8", "attention.v_head_dim=16", "num_layers=3"]


def small_cfg():
    return get_preset("tiny").replace(**{k: json.loads(v) for k, v in (s.split("=") for s in SMALL)})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "dataclasses.py", "shlex.py", "fractions.py", "heapq.py",
                 "bisect.py", "calendar.py", "csv.py", "difflib.py", "ftplib.py", "gettext.py"):
        (root / name).write_text((stdlib / name).read_text())
    return root


def _args(corpus, out, cache, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--cache-dir", str(cache), "--vocab-size", "512",
            "--val-fraction", "0.2", "--batch-size", "4", "--seq-len", "64", "--dtype", "float32",
            "--threads", "2", "--eval-every", "5", "--eval-batches", "2", "--samples", "0", "--warmup-steps", "3",
            *[a for s in SMALL for a in ("--override", s)], *extra]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return out


def test_resume_after_sigkill_reproduces_losses_exactly(corpus, tmp_path):
    cache = tmp_path / "cache"
    assert main(_args(corpus, tmp_path / "a", cache, "--steps", "14", "--ckpt-every", "4")) == 0
    reference = _losses(tmp_path / "a")
    assert sorted(reference) == list(range(1, 15))

    run = tmp_path / "b"
    cmd = [sys.executable, "-m", "moeforge", *_args(corpus, run, cache, "--steps", "14", "--ckpt-every", "4")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it mid-run, after the step-8 checkpoint and before the end
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 10:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert 8 <= killed_at < 14, killed_at
    assert main(_args(corpus, run, cache, "--steps", "14", "--ckpt-every", "4", "--resume")) == 0
    assert _losses(run) == reference  # bit-identical, step for step


def test_outputs_on_disk_and_generate(corpus, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(_args(corpus, run, tmp_path / "cache", "--steps", "6", "--ckpt-every", "100")) == 0
    assert (run / "loss.png").stat().st_size > 10_000 and (run / "expert_load.png").stat().st_size > 10_000
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["hidden_size"] == 64 and cfg["data"]["vocab_size"] == 512
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "load_max_over_mean", "experts_without_tokens",
            "routing_entropy", "bias_min", "bias_max"} <= set(train[0])
    assert len(train[0]["load_max_over_mean"]) == 2 + 1  # two MoE layers and one MTP layer
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 6] and evals[-1]["val_loss"] < train[0]["main_loss"]
    ckpt = run / "checkpoints" / "step_0000006"
    assert {"config.json", "model.safetensors", "tokenizer.json", "optimizer.pt", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first) > 5
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first  # greedy: same text from the run folder and the checkpoint
    # speculative: the same greedy text; 3 drafts per step unless --draft-tokens says otherwise
    for extra, drafts in (([], 3), (["--draft-tokens", "1"], 1)):
        assert main(["generate", "--ckpt", str(ckpt), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0",
                     "--speculative", *extra]) == 0
        out = capsys.readouterr()
        rates = [ln for ln in out.err.splitlines() if ln.startswith("MTP draft acceptance:")]
        assert out.out == first and len(rates) == 1 and rates[0].count(",") == drafts - 1
    assert main(["plot", str(run)]) == 0


def test_run_folder_is_not_overwritten_without_resume(corpus, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(_args(corpus, run, tmp_path / "cache", "--steps", "2")) == 0
    capsys.readouterr()
    assert main(_args(corpus, run, tmp_path / "cache", "--steps", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "already has checkpoints; pass --resume" in err and len(err.splitlines()) == 1


def test_resume_of_a_sharded_run_in_one_process_is_one_line(corpus, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(_args(corpus, run, tmp_path / "cache", "--steps", "2")) == 0
    (run / "checkpoints" / "step_0000002" / ".complete").write_text("")  # as a multi-process run marks its shards
    capsys.readouterr()
    assert main(_args(corpus, run, tmp_path / "cache", "--steps", "4", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sharded checkpoint of a multi-process run" in err
    assert (run / "checkpoints" / "step_0000002" / "model.safetensors").is_file()  # nothing was touched


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--seq-len", "5000"], "seq_len 5000 is above the model's maximum"),
        (["--override", "vocab_size=300"], "vocab_size 300 is smaller than the tokenizer's"),
        (["--optimizer", "sgd"], "optimizer 'sgd' is not one of"),
        (["--vocab-size", "100"], "vocab"),
    ],
)
def test_bad_training_input_is_one_line(corpus, tmp_path, capsys, extra, message):
    assert main(_args(corpus, tmp_path / "r", tmp_path / "cache", "--steps", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("moeforge: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_missing_and_empty_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_non_finite_steps_are_skipped_then_abort(corpus, tmp_path, monkeypatch):
    import moeforge.train.trainer as tr

    tcfg = TrainConfig(steps=20, batch_size=2, seq_len=32, dtype="float32", max_bad_steps=3, ckpt_every=2,
                       eval_every=100, samples=0)
    dcfg = DataConfig(paths=[str(corpus)], vocab_size=512, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    trainer = Trainer(small_cfg(), tcfg, dcfg, tmp_path / "r")
    real = tr.compute_losses
    calls = {"n": 0}

    def flaky(out, window, cfg, head=None):
        calls["n"] += 1
        losses = real(out, window, cfg, head)
        if calls["n"] == 2 or calls["n"] >= 5:  # one bad step, then bad forever
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(tr, "compute_losses", flaky)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(TrainingAborted, match="3 non-finite steps"):
        trainer.run()
    # steps 1 and 2 succeeded around the skipped one, then 3 bad in a row: the step-2 checkpoint is intact
    assert trainer.step == 3
    before = torch.load(tmp_path / "r" / "checkpoints" / "step_0000002" / "optimizer.pt", weights_only=True)
    assert before["optimizers"]


def test_disk_full_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    import moeforge.train.state as st

    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=32, dtype="float32", ckpt_every=2, eval_every=100, samples=0)
    dcfg = DataConfig(paths=[str(corpus)], vocab_size=512, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    trainer = Trainer(small_cfg(), tcfg, dcfg, tmp_path / "r")

    real = st.write_model

    def full_disk(model, folder, extra=None):
        if trainer.step == 4:
            raise OSError(28, "No space left on device")
        return real(model, folder, extra)

    monkeypatch.setattr(st, "write_model", full_disk)
    with pytest.raises(OSError, match="No space left on device; the previous checkpoint .*step_0000002 is intact"):
        trainer.run()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step_0000002"]
