"""Data-parallel training (acestep_lora/distributed.py): two processes on the CPU (gloo) under torchrun train what one
process trains on the same global batches; a run cancelled in one process and resumed equals the uninterrupted one;
a killed process leaves a resumable checkpoint and no process behind; another number of processes continues a
checkpoint; previews and the validation loss are made and written by process 0 and recorded alike everywhere, and
their failure in process 0 stops both. One torchrun launch runs all the two-process commands
(tests/distributed_worker.py)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from acestep_lora import distributed
from acestep_lora.data import collate
from acestep_lora.train import Trainer, train_lora

from test_train import config, losses, tensors  # noqa: F401  (tensors: the fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
# 3 samples, batch_size 1, 2 processes: 2 optimizer steps per epoch, the second with a part for process 0 only
SETTINGS = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.1, learning_rate=2e-3, train_epochs=4,
                save_every_n_epochs=2, warmup_steps=2, device="cpu", batch_size=1, preview_every_n_epochs=0)
# six samples: one held out for the validation loss; previews of 1 s with the LoRA off and at epochs 2 and 4
HEAR = dict(preview_every_n_epochs=2, preview_seconds=1.0, validation_every_n_epochs=1)


def argv(tiny_ckpt, tensor_dir, out, **extra):
    args = ["train", "--tensor-dir", tensor_dir, "--checkpoint-dir", tiny_ckpt, "--output-dir", str(out)]
    for name, value in {**SETTINGS, **extra}.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def adapter(folder):
    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def relative_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def torchrun(root, runs, timeout=300):
    """``runs`` (tests/distributed_worker.py) in 2 processes under torchrun; -> torchrun's exit status and output."""
    spec = root / "spec.json"
    spec.write_text(json.dumps({"out": str(root), "runs": runs}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "distributed_worker.py"), str(spec)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the two-process runs hung (killed after {timeout} s):\n" + process.communicate()[0][-4000:])
    return process.returncode, output


@pytest.fixture(scope="module")
def launch(tiny_ckpt, tensors, six, tmp_path_factory):  # noqa: F811
    """One torchrun launch: a full run, a run Ctrl-C'd in process 1 and resumed, a run with previews and the
    validation loss, one whose validation loss fails in process 0 alone, a run whose process 1 is killed (SIGKILL).
    Returns the folder, torchrun's exit status and output."""
    root = tmp_path_factory.mktemp("ddp")
    runs = [{"name": "full", "argv": argv(tiny_ckpt, tensors, root / "full")},
            {"name": "cancel", "argv": argv(tiny_ckpt, tensors, root / "cancel"),
             "fault": {"rank": 1, "step": 3, "signal": "SIGINT"}},
            {"name": "resume", "argv": argv(tiny_ckpt, tensors, root / "cancel", resume_from="latest")},
            {"name": "hear", "argv": argv(tiny_ckpt, six, root / "hear", **HEAR)},
            {"name": "fail", "argv": argv(tiny_ckpt, six, root / "fail", **dict(HEAR, train_epochs=1)),
             "fault": {"rank": 0, "raise": "validation"}},
            {"name": "kill", "argv": argv(tiny_ckpt, tensors, root / "kill"),
             "fault": {"rank": 1, "step": 5, "signal": "SIGKILL"}}]
    return (root, *torchrun(root, runs))


def report(root, name, rank):
    path = root / f"{name}.rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_two_processes_train_what_one_process_trains_on_the_same_global_batches(launch, tiny_ckpt, tensors,  # noqa
                                                                                 tmp_path):
    root, _, output = launch
    assert report(root, "full", 0)["code"] == report(root, "full", 1)["code"] == 0, output[-3000:]
    # the same global batches in one process: batch_size 1 x gradient_accumulation 2 = 2 processes x 1 x 1
    one = train_lora(config(tiny_ckpt, tensors, tmp_path / "one", **dict(SETTINGS, gradient_accumulation=2)))
    two = adapter(root / "full" / "final")
    assert relative_difference(two, adapter(os.path.dirname(one.adapter_dir))) <= 1e-6
    history = json.loads(json.dumps(torch.load(root / "full" / "final" / "training_state.pt",
                                               weights_only=True)["history"]))
    assert [p[0] for p in history] == list(range(1, 9)) and one.steps == 8
    assert losses(one) == pytest.approx([p[1] for p in history], rel=1e-6)
    # both processes hold the same LoRA, bit for bit
    ranks = [load_file(root / f"full.rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # process 0 alone logs and writes: one header per run (6 runs), one summary per finished run (full, resume),
    # one line per epoch in train_log.jsonl
    assert output.count("2 samples per step from 2 processes") == 6 and output.count("done: 4 epochs, 8 steps") == 2
    assert [json.loads(x)["epoch"] for x in open(root / "full" / "train_log.jsonl")] == [1, 2, 3, 4]
    info = json.load(open(root / "full" / "final" / "checkpoint.json"))
    assert info["signature"]["world_size"] == 2 and info["global_step"] == 8


def test_ctrl_c_in_one_process_stops_both_and_the_resumed_run_equals_the_uninterrupted(launch):
    root, _, output = launch
    # process 1's Ctrl-C before step 3 is agreed at step 4, where process 1 has no part: both stop there
    assert report(root, "cancel", 0)["code"] == report(root, "cancel", 1)["code"] == 130, output[-3000:]
    saved = sorted(d for d in os.listdir(root / "cancel" / "checkpoints") if d.startswith("cancelled_"))
    assert saved == ["cancelled_epoch_2_step_3"]
    saved = saved[0]
    state = torch.load(root / "cancel" / "checkpoints" / saved / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["next_batch"], state["settings"]["world_size"]) == (2, 2, 2)
    assert output.count("stopped at epoch 2 step 3; resumable checkpoint") == 1  # process 0 says it, once
    # continued by two processes: the uninterrupted run's LoRA and losses, bit for bit
    assert report(root, "resume", 0)["code"] == report(root, "resume", 1)["code"] == 0
    full, resumed = adapter(root / "full" / "final"), adapter(root / "cancel" / "final")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    history = [torch.load(root / run / "final" / "training_state.pt", weights_only=True)["history"]
               for run in ("full", "cancel")]
    assert history[0] == history[1]


def test_a_killed_process_leaves_a_resumable_checkpoint_and_no_process_behind(launch, tiny_ckpt, tensors,  # noqa
                                                                               tmp_path):
    root, code, output = launch
    assert code != 0 and report(root, "kill", 1) is None  # process 1 died before optimizer step 5
    survivor = report(root, "kill", 0)
    assert survivor["code"] == 1 and survivor["seconds"] < 120, output[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(survivor["pid"], 0)  # torchrun returned: no process is left
    # process 0 noticed at the next step and saved where it began (step 5 was applied in both)
    checkpoint = root / "kill" / "checkpoints" / "cancelled_epoch_3_step_5"
    assert checkpoint.is_dir() and f"a resumable checkpoint was saved in {checkpoint}" in output
    assert "process 0: lost contact with another training process" in output
    # one process continues it (gradient_accumulation 2: the same global batch), with a note: the uninterrupted
    # two-process run's LoRA
    resumed = train_lora(config(tiny_ckpt, tensors, root / "kill",
                                **dict(SETTINGS, gradient_accumulation=2, resume_from="latest")))
    assert "processes 2 -> 1 (global batch 2 -> 2 samples)" in resumed.log and resumed.steps == 8
    assert relative_difference(adapter(os.path.dirname(resumed.adapter_dir)), adapter(root / "full" / "final")) <= 1e-6


def test_previews_and_validation_by_process_0_recorded_alike_everywhere(launch, tiny_ckpt, six, tmp_path):
    root, _, output = launch
    reports = [report(root, "hear", r) for r in (0, 1)]
    assert reports[0]["code"] == reports[1]["code"] == 0, output[-3000:]
    # what goes into checkpoints is the same in both processes: the validation losses, the preview sets
    assert reports[0]["notes"] == reports[1]["notes"]
    assert [n["epoch"] for n in reports[0]["notes"] if "validation_loss" in n] == [0, 1, 2, 3, 4]
    assert [n["epoch"] for n in reports[0]["notes"] if "previews" in n] == [0, 2, 4]
    # written once, by process 0
    log = [json.loads(x) for x in open(root / "hear" / "train_log.jsonl")]
    assert [e["epoch"] for e in log if "validation_loss" in e] == [0, 1, 2, 3, 4]
    assert [e["epoch"] for e in log if "previews" in e] == [0, 2, 4]
    for folder in ("base", "epoch_2", "epoch_4"):
        assert sorted(os.listdir(root / "hear" / "previews" / folder)) == ["preview_1.flac", "preview_2.flac"]
    ranks = [load_file(root / f"hear.rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # the values one process measures on the same global batches; best/ holds the lowest epoch
    train_lora(config(tiny_ckpt, six, tmp_path / "one", **dict(SETTINGS, gradient_accumulation=2,
                                                               validation_every_n_epochs=1)))
    mine = [(e["epoch"], e["validation_loss"]) for e in log if "validation_loss" in e]
    theirs = [(e["epoch"], e["validation_loss"]) for e in map(json.loads, open(tmp_path / "one" / "train_log.jsonl"))
              if "validation_loss" in e]
    assert [e for e, _ in mine] == [e for e, _ in theirs]
    assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-5)
    best = json.load(open(root / "hear" / "best" / "best.json"))
    assert best["epoch"] == min((v, e) for e, v in mine if e >= 1)[1]


def test_a_failure_in_process_0_alone_stops_both(launch):
    root, _, output = launch
    assert report(root, "fail", 0)["code"] == report(root, "fail", 1)["code"] == 1, output[-3000:]
    assert output.count("error: injected failure in process 0") == 2  # said by both processes


def test_a_step_draws_the_same_whatever_ran_before(tiny_ckpt, tensors, tmp_path):  # noqa: F811
    """Each micro-batch's draws are seeded from (seed, step, part): random numbers drawn between steps (a hook's
    preview, a validation loss) change nothing, which is also what makes a part compute the same in any process."""
    plain = train_lora(config(tiny_ckpt, tensors, tmp_path / "plain", train_epochs=2, save_every_n_epochs=0))
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path / "hooked", train_epochs=2, save_every_n_epochs=0))
    trainer.epoch_hooks.append(lambda t, epoch: (torch.rand(7), t.loss(collate([t.data.samples[0]])),
                                                 t.noise_gen.seed()))
    try:
        hooked = trainer.train()
    finally:
        trainer.cleanup()
    assert losses(hooked) == losses(plain)
    a, b = adapter(os.path.dirname(plain.adapter_dir)), adapter(os.path.dirname(hooked.adapter_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_alone_and_its_share():
    assert not distributed.launched() and distributed.is_main() and distributed.current() is distributed.SINGLE
    assert distributed.on_main(lambda x: x + 1, 1) == 2
    assert list(distributed.Processes(1, 3).share(7)) == [1, 4] and list(distributed.Processes(2, 3).share(2)) == []
    assert list(distributed.SINGLE.share(3)) == [0, 1, 2]


def test_the_scaling_bench_measures_the_training_loop(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
    import ddp_scaling

    assert ddp_scaling.measure(str(tmp_path), 100, steps=2, warmup=1, device="cpu", rank=4) > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_what_one_gpu_trains(tiny_ckpt, tensors, tmp_path):  # noqa: F811
    code, output = torchrun(tmp_path, [{"name": "gpus", "argv": argv(tiny_ckpt, tensors, tmp_path / "two",
                                                                     device="cuda")}])
    assert code == 0, output[-3000:]
    assert "2 training processes joined (NCCL, cuda)" in output
    ranks = [load_file(tmp_path / f"gpus.rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    one = train_lora(config(tiny_ckpt, tensors, tmp_path / "one", **dict(SETTINGS, device="cuda",
                                                                        gradient_accumulation=2)))
    # bf16 autocast, and attention's backward on a GPU is not bit-reproducible even in one process
    assert relative_difference(adapter(tmp_path / "two" / "final"), adapter(os.path.dirname(one.adapter_dir))) < 1e-3
