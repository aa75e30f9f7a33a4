"""Training engine: learning, exact resume, cancel, divergence, the LoRA files, and bad inputs."""
import json
import math
import os
import re
import shutil

import pytest
import torch

from acestep_lora import load_dit
from acestep_lora.data import collate
from acestep_lora.lora_io import lora_pairs, merged_delta, read_comfy_lora
from acestep_lora.optim import lr_factor, warmup_for
from acestep_lora.prepare import PrepareSettings, prepare_dataset
from acestep_lora.run_state import RunState
from acestep_lora.train import TrainConfig, Trainer, TrainingCancelled, TrainingStopped, train_lora

from test_prepare import item


@pytest.fixture(scope="module")
def tensors(tiny_ckpt, tmp_path_factory):
    """Three prepared samples of different lengths (1.0 s, 1.5 s, 1.0 s) on the turbo tiny checkpoint."""
    out = str(tmp_path_factory.mktemp("tensors"))
    prepare_dataset([item("a", 1.0), item("b", 1.5, lyrics="la la, la\nla"), item("c", 1.0)], out,
                    PrepareSettings(tiny_ckpt, device="cpu"))
    return out


def config(tiny_ckpt, tensors, out, **kw):
    base = dict(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(out), lora_rank=8, lora_alpha=16,
                lora_dropout=0.1, learning_rate=2e-3, train_epochs=4, save_every_n_epochs=2, warmup_steps=2,
                device="cpu", preview_every_n_epochs=0)  # previews: tests/test_previews.py
    base.update(kw)
    return TrainConfig(**base)


def losses(result):
    return [p[1] for p in result.history]


# -- schedule and sampling --------------------------------------------------------------------------------------

def test_official_lr_schedule():
    total, warm = 1000, warmup_for(1000, 100)
    assert warm == 100 and warmup_for(50, 100) == 5 and warmup_for(3, 100) == 1
    assert lr_factor(0, total, warm) == pytest.approx(0.1)
    assert lr_factor(50, total, warm) == pytest.approx(0.55)
    assert lr_factor(100, total, warm) == pytest.approx(1.0)
    assert lr_factor(550, total, warm) == pytest.approx(0.505)
    assert lr_factor(999, total, warm) == pytest.approx(0.01, abs=1e-4)


def test_the_variant_chooses_the_timestep_sampling(tiny_ckpt, tensors, tmp_path):
    turbo = Trainer(config(tiny_ckpt, tensors, tmp_path / "a"))
    turbo.setup()
    assert turbo.sampling == turbo.objective.sampling == "turbo_discrete" and turbo.objective.cfg_dropout == 0
    base = Trainer(config(tiny_ckpt, tensors, tmp_path / "b", timestep_sampling="logit_normal", cfg_dropout=0.3))
    base.setup()
    assert base.objective.sampling == "logit_normal" and base.objective.cfg_dropout == 0.3
    assert (base.objective.mu, base.objective.sigma) == (-0.4, 1.0)  # from the tiny checkpoint's config.json


def test_cfg_dropout_replaces_condition_with_null_embedding(tiny_ckpt, tensors, tmp_path, monkeypatch):
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path, timestep_sampling="logit_normal", cfg_dropout=0.5))
    trainer.setup()
    seen = []
    original = trainer.net.forward
    monkeypatch.setattr(trainer.net, "forward", lambda **kw: seen.append(kw["encoder_hidden_states"]) or original(**kw))
    for _ in range(40):
        trainer.loss(collate([trainer.data.samples[0]]))
    null = trainer.objective.null_condition[0, 0]
    dropped = [bool((s[0] == null).all()) for s in seen]
    assert 8 < sum(dropped) < 32  # ~50 %
    original_rows = trainer.data.samples[0]["encoder_hidden_states"]
    for s, drop in zip(seen, dropped):  # a sample keeps its whole condition or loses all of it
        assert drop or torch.equal(s[0], original_rows)


# -- learning and the files -------------------------------------------------------------------------------------

def test_loss_falls_on_memorisable_data(tiny_ckpt, tensors, tmp_path):
    result = train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=40, learning_rate=3e-3,
                               lora_dropout=0.0, save_every_n_epochs=0, lora_rank=16, lora_alpha=16))
    values = losses(result)
    assert len(values) == 40 * 3
    first, last = sum(values[:15]) / 15, sum(values[-15:]) / 15
    assert last < 0.85 * first, (first, last)


def test_outputs_peft_and_comfy_files(tiny_ckpt, tensors, tmp_path):
    from peft import PeftModel

    result = train_lora(config(tiny_ckpt, tensors, tmp_path / "run", loras_dir=str(tmp_path / "loras"),
                               comfy_dtype="float32", lora_dropout=0.0))
    adapter = result.adapter_dir
    assert sorted(f for f in os.listdir(adapter) if f != "README.md") == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = list(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    pattern = re.compile(r"^base_model\.model\.layers\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj\.lora_[AB]\.weight$")
    assert keys and all(pattern.match(k) for k in keys) and len(keys) == 2 * 8 * 2  # 2 layers x 8 projections

    # The PEFT folder loads into a freshly loaded official-layout decoder and reproduces what was trained.
    trained = PeftModel.from_pretrained(load_dit(tiny_ckpt).decoder, adapter).eval()
    plain = load_dit(tiny_ckpt).decoder.eval()
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 20, 64, generator=g), timestep=torch.tensor([0.5]),
              timestep_r=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
              context_latents=torch.randn(1, 20, 128, generator=g))
    with torch.no_grad():
        lora_out, base_out = trained(**kw)[0], plain(**kw)[0]
    assert (lora_out - base_out).abs().max() > 1e-4  # the adapter does something

    # The ComfyUI file: official-prefix keys ComfyUI maps to diffusion_model.decoder.*, alpha per module, and
    # W + (alpha/r)·B·A reproduces the PEFT model.
    tensors_, meta = read_comfy_lora(result.comfy_lora_path)
    assert os.path.dirname(result.comfy_lora_path) == str(tmp_path / "loras")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors_}
    decoder_weights = set(load_dit(tiny_ckpt).decoder.state_dict())
    for module in modules:
        assert module.startswith("base_model.model.layers.")
        assert module[len("base_model.model."):] + ".weight" in decoder_weights  # ComfyUI's ACEStep15 mapping
        assert tensors_[module + ".alpha"].item() == 16.0
        assert {module + ".lora_A.weight", module + ".lora_B.weight"} <= set(tensors_)
    assert meta["acestep_lora.rank"] == "8" and meta["acestep_lora.alpha"] == "16"
    assert meta["acestep_lora.base_config"] == "acestep-v15-turbo" and meta["acestep_lora.dataset_size"] == "3"
    patched = load_dit(tiny_ckpt).decoder.eval()
    deltas = merged_delta(lora_pairs(tensors_), alpha=16.0, rank=8)
    with torch.no_grad():
        for module, delta in deltas.items():
            patched.get_submodule(module).weight += delta
        merged_out = patched(**kw)[0]
    assert torch.allclose(merged_out, lora_out, atol=1e-5, rtol=1e-5)
    # Without the alpha tensor ComfyUI would apply scale 1.0 instead of alpha/r = 2: a different result.
    assert not torch.allclose(base_out + (lora_out - base_out) / 2, lora_out, atol=1e-5)


def test_default_comfy_file_is_bf16_and_close(tiny_ckpt, tensors, tmp_path):
    result = train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=1, save_every_n_epochs=0))
    tensors_, _ = read_comfy_lora(result.comfy_lora_path)
    assert {v.dtype for k, v in tensors_.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    from safetensors.torch import load_file
    peft = lora_pairs(load_file(os.path.join(result.adapter_dir, "adapter_model.safetensors")))
    for module, ab in lora_pairs(tensors_).items():
        assert torch.allclose(ab["A"].float(), peft[module]["A"], rtol=1e-2, atol=1e-4)


def test_checkpoints_and_log(tiny_ckpt, tensors, tmp_path):
    result = train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=4, save_every_n_epochs=2))
    ckpt = tmp_path / "checkpoints" / "epoch_2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and (ckpt / "training_state.pt").is_file()
    assert (ckpt / f"{tmp_path.name}_epoch_2.safetensors").is_file()
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 6
    lines = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [e["epoch"] for e in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and e["lr"] > 0 for e in lines)
    assert "epoch 4/4" in result.log and "PEFT adapter:" in result.log


def test_hooks_see_each_epoch_logged_before_its_checkpoint(tiny_ckpt, tensors, tmp_path):
    """Where previews and a validation loss plug in, without touching the loop: what an epoch hook records is in
    that epoch's checkpoint (so a resume from it keeps it); start, checkpoint and finish hooks too."""
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path, train_epochs=3, save_every_n_epochs=2))
    seen = []
    trainer.start_hooks.append(lambda t: seen.append(("start", t.global_step, t.metrics.lines[0][:11])))
    trainer.epoch_hooks.append(lambda t, epoch: seen.append(
        (epoch, [e["epoch"] for e in t.metrics.epoch_log], (tmp_path / "checkpoints" / f"epoch_{epoch}").is_dir()))
        or t.metrics.record({"hook": epoch}))
    trainer.checkpoint_hooks.append(lambda t, folder: open(os.path.join(folder, "extra.txt"), "w").write("x"))
    trainer.finish_hooks.append(lambda t: "a line from a finish hook")
    try:
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert seen == [("start", 0, "training on"), (1, [1], False), (2, [1, 2], False), (3, [1, 2, 3], False)]
    saved = torch.load(tmp_path / "checkpoints" / "epoch_2" / "training_state.pt", weights_only=True)
    assert [n["hook"] for n in saved["notes"]] == [1, 2]
    assert (tmp_path / "checkpoints" / "epoch_2" / "extra.txt").is_file()
    assert (tmp_path / "final" / "extra.txt").is_file()
    assert result.summary.endswith("\na line from a finish hook")
    log = [json.loads(x) for x in open(tmp_path / "train_log.jsonl")]
    assert [e["hook"] for e in log if "hook" in e] == [1, 2, 3]


# -- resume ------------------------------------------------------------------------------------------------------

def test_resume_reproduces_uninterrupted_run_exactly(tiny_ckpt, tensors, tmp_path):
    full = train_lora(config(tiny_ckpt, tensors, tmp_path / "full", train_epochs=6, save_every_n_epochs=3,
                             batch_size=2))
    resumed = train_lora(config(tiny_ckpt, tensors, tmp_path / "resumed", train_epochs=6, save_every_n_epochs=3,
                                batch_size=2, resume_from=str(tmp_path / "full" / "checkpoints" / "epoch_3")))
    assert full.steps == resumed.steps == 12
    assert losses(resumed) == losses(full)  # bit-exact, steps 1-6 restored from the checkpoint, 7-12 recomputed
    from safetensors.torch import load_file
    a = load_file(os.path.join(full.adapter_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed.adapter_dir, "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_lora_weights(tiny_ckpt, tensors, tmp_path):
    """The official trainer's resume silently restarted the LoRA; ours must carry the trained weights over."""
    train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=2, save_every_n_epochs=1))
    fresh = Trainer(config(tiny_ckpt, tensors, tmp_path / "fresh", train_epochs=3))
    fresh.setup()
    assert all(bool((layer.lora_B == 0).all()) for layer in fresh.lora_layers.values())
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path, train_epochs=3, resume_from="latest"))
    trainer.setup()
    assert trainer.resume_dir.endswith("final")  # latest = the most optimizer steps
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "final" / "adapter" / "adapter_model.safetensors"))
    for name, layer in trainer.lora_layers.items():
        assert torch.equal(layer.lora_B, saved[f"base_model.model.{name}.lora_B.weight"])
        assert bool((layer.lora_B != 0).any())


def test_cancel_saves_a_checkpoint_that_resumes_exactly(tiny_ckpt, tensors, tmp_path):
    full = train_lora(config(tiny_ckpt, tensors, tmp_path / "full", train_epochs=4, save_every_n_epochs=0,
                             gradient_accumulation=2))
    calls = [0]

    def cancel_mid_epoch():
        calls[0] += 1
        return calls[0] == 8  # epoch 3, second micro-batch: inside an accumulation group

    with pytest.raises(TrainingCancelled) as interrupt:
        train_lora(config(tiny_ckpt, tensors, tmp_path / "run", train_epochs=4, save_every_n_epochs=0,
                          gradient_accumulation=2), cancel_requested=cancel_mid_epoch)
    saved = os.listdir(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1 and saved[0].startswith("cancelled_epoch_3_step_4")
    # the caller (node, command line) learns where to continue from, to tell the user
    where = interrupt.value.resumable
    assert (where.epoch, where.step) == (3, 4) and where.checkpoint == str(tmp_path / "run" / "checkpoints" / saved[0])
    assert where.message("go on").startswith(f"stopped at epoch 3 step 4; resumable checkpoint: {where.checkpoint}")
    resumed = train_lora(config(tiny_ckpt, tensors, tmp_path / "run", train_epochs=4, save_every_n_epochs=0,
                                gradient_accumulation=2, resume_from="latest"))
    assert losses(resumed) == losses(full) and resumed.steps == full.steps == 8


def rewrite_samples(tensor_dir, remove=(), add=()):
    """Change a prepared folder as removing songs and adding others, then running Prepare again, would: ``remove``
    drops samples by name; each name in ``add`` becomes a new sample (a copy of the last one's tensors under a new
    file name and cache key)."""
    path = os.path.join(tensor_dir, "manifest.json")
    manifest = json.load(open(path))
    info = [entry for entry in manifest["samples_info"] if entry["name"] not in remove]
    template = manifest["samples_info"][-1]
    for name in add:
        entry = dict(template, name=name, file=f"{name}_added.pt", cache_key=f"{name}-new-key")
        shutil.copy(os.path.join(tensor_dir, template["file"]), os.path.join(tensor_dir, entry["file"]))
        info.append(entry)
    manifest.update(samples_info=info, samples=[e["file"] for e in info], num_samples=len(info))
    json.dump(manifest, open(path, "w"))


def test_resume_after_the_dataset_changed_mid_epoch(tiny_ckpt, tensors, tmp_path, pack_log):
    """Cancel mid-epoch, remove two songs and add one, Prepare again, resume latest (an IndexError once): the rest
    of the epoch keeps the samples that still exist, the step count and the schedule are recomputed, and the log
    says so."""
    data = str(tmp_path / "tensors")
    shutil.copytree(tensors, data)
    calls = [0]

    def cancel_in_epoch_2():
        calls[0] += 1
        return calls[0] == 5  # epoch 2, second batch: step 4 done

    with pytest.raises(TrainingCancelled):
        train_lora(config(tiny_ckpt, data, tmp_path / "run", save_every_n_epochs=0), cancel_requested=cancel_in_epoch_2)
    (cancelled,) = (tmp_path / "run" / "checkpoints").iterdir()
    state = torch.load(cancelled / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["global_step"], state["next_batch"]) == (2, 4, 1)

    rewrite_samples(data, remove=["a", "b"], add=["d"])  # 3 -> 2 samples: 3 -> 2 steps per epoch
    left = [batch for batch in state["epoch_order"][1:]
            if any(state["dataset_keys"][i] in {e["cache_key"] for e in json.load(open(f"{data}/manifest.json"))
                                                ["samples_info"]} for i in batch)]
    total = 4 + len(left) + 2 * 2  # steps done + the rest of epoch 2 + epochs 3 and 4
    result = train_lora(config(tiny_ckpt, data, tmp_path / "run", save_every_n_epochs=0, resume_from="latest"))

    assert result.steps == total and [p[0] for p in result.history] == list(range(1, total + 1))
    note = (f"dataset changed since the checkpoint: 2 samples removed, 1 added; 3 -> 2 steps per epoch, {total} "
            "steps in all; schedule recomputed")
    assert note in result.log and note in pack_log.text
    lines = [json.loads(x) for x in open(tmp_path / "run" / "train_log.jsonl")]
    assert [e.get("epoch") for e in lines if "loss" in e] == [1, 2, 3, 4]
    assert [e for e in lines if "note" in e] == [{"note": note, "epoch": 2, "step": 4}]
    assert lines.index({"note": note, "epoch": 2, "step": 4}) == 1  # after epoch 1, before epoch 2 ended
    # the learning rate followed the recomputed schedule to its end
    final_lr = 2e-3 * lr_factor(total - 1, total, warmup_for(total, 2))
    assert result.history[-1][2] == pytest.approx(final_lr, rel=1e-9) and final_lr < 2e-3 * 0.05


def test_resume_after_the_dataset_changed_at_an_epoch_end(tiny_ckpt, tensors, tmp_path):
    """A finished run resumed for one more epoch on a smaller dataset: 2 x 3 steps done, then 1 x 2."""
    data = str(tmp_path / "tensors")
    shutil.copytree(tensors, data)
    train_lora(config(tiny_ckpt, data, tmp_path / "run", train_epochs=2, save_every_n_epochs=0))
    rewrite_samples(data, remove=["b"])
    result = train_lora(config(tiny_ckpt, data, tmp_path / "run", train_epochs=3, save_every_n_epochs=0,
                               resume_from="latest"))
    assert result.steps == 8 and [p[0] for p in result.history] == list(range(1, 9))
    assert ("dataset changed since the checkpoint: 1 sample removed, 0 added; train_epochs 2 -> 3; 3 -> 2 steps per "
            "epoch, 8 steps in all; schedule recomputed") in result.log
    assert result.history[-1][2] == pytest.approx(2e-3 * lr_factor(7, 8, warmup_for(8, 2)), rel=1e-9)


def test_epoch_loras_are_published_for_comfyui(tiny_ckpt, tensors, tmp_path):
    """Periodic checkpoints' LoRAs go to <loras_dir>/<lora_name>/epoch_N.safetensors; another run's stay."""
    loras = tmp_path / "loras"
    first = train_lora(config(tiny_ckpt, tensors, tmp_path / "one" / "song", loras_dir=str(loras),
                              train_epochs=4, save_every_n_epochs=1))
    published = [str(loras / "song" / f"epoch_{n}.safetensors") for n in (1, 2, 3)]
    assert first.epoch_loras == published
    for n, path in zip((1, 2, 3), published):
        copy = tmp_path / "one" / "song" / "checkpoints" / f"epoch_{n}" / f"song_epoch_{n}.safetensors"
        assert open(path, "rb").read() == copy.read_bytes()
    assert "per-epoch LoRAs (3) in " + str(loras) + ": song/epoch_1.safetensors, song/epoch_2.safetensors" \
        in first.summary
    before = [open(p, "rb").read() for p in published]
    second = train_lora(config(tiny_ckpt, tensors, tmp_path / "two" / "song", loras_dir=str(loras), seed=7,
                               train_epochs=2, save_every_n_epochs=1))
    assert second.epoch_loras == [str(loras / "song" / "epoch_1_2.safetensors")]
    assert [open(p, "rb").read() for p in published] == before
    assert not [f for f in os.listdir(loras / "song") if f.endswith(".tmp")]


def test_new_run_refuses_to_overwrite(tiny_ckpt, tensors, tmp_path, monkeypatch):
    train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=2, save_every_n_epochs=1))
    before = {p: os.path.getmtime(p) for p in (tmp_path / "final").rglob("*")}
    # decided from the small checkpoint.json, without loading the (optimizer-sized) training state
    monkeypatch.setattr(RunState, "load", lambda d: pytest.fail("training state loaded"))
    with pytest.raises(FileExistsError, match="finished run with other settings.*train_epochs 2 -> 3.*resume_from"):
        train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=3, save_every_n_epochs=1))
    assert {p: os.path.getmtime(p) for p in (tmp_path / "final").rglob("*")} == before


def test_unfinished_run_refuses_to_restart(tiny_ckpt, tensors, tmp_path):
    with pytest.raises(TrainingCancelled):
        train_lora(config(tiny_ckpt, tensors, tmp_path), cancel_requested=lambda: True)
    with pytest.raises(FileExistsError, match="unfinished training run.*'latest'"):
        train_lora(config(tiny_ckpt, tensors, tmp_path))


def test_finished_run_with_same_settings_is_reused(tiny_ckpt, tensors, tmp_path, monkeypatch):
    first = train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=2, save_every_n_epochs=1))
    monkeypatch.setattr(Trainer, "setup", lambda self: pytest.fail("retrained instead of reusing"))
    again = train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=2, save_every_n_epochs=1))
    assert again.adapter_dir == first.adapter_dir and again.comfy_lora_path == first.comfy_lora_path
    assert again.steps == first.steps and losses(again) == losses(first) and "already trained" in again.log


def test_requeue_with_another_dtype_or_name_yields_the_file_it_names(tiny_ckpt, tensors, tmp_path, monkeypatch):
    """comfy_dtype and lora_name change only the exported file: a finished run is re-exported from its fp32
    adapter, never retrained, and the result names a file that exists, in the dtype asked for."""
    from safetensors.torch import load_file
    loras = tmp_path / "loras"
    settings = dict(loras_dir=str(loras), train_epochs=2, save_every_n_epochs=0)
    first = train_lora(config(tiny_ckpt, tensors, tmp_path / "run", **settings))
    assert first.comfy_lora_path == str(loras / "run.safetensors")
    adapter = lora_pairs(load_file(os.path.join(first.adapter_dir, "adapter_model.safetensors")))
    monkeypatch.setattr(Trainer, "setup", lambda self: pytest.fail("retrained instead of re-exporting"))

    def check(result, path, dtype):
        assert result.comfy_lora_path == str(path) and os.path.isfile(path)
        weights, meta = read_comfy_lora(str(path))
        assert {v.dtype for k, v in weights.items() if not k.endswith(".alpha")} == {dtype}
        for module, ab in lora_pairs(weights).items():  # the trained adapter, cast once
            assert torch.equal(ab["A"], adapter[module]["A"].to(dtype))
            assert torch.equal(ab["B"], adapter[module]["B"].to(dtype))
        assert meta["acestep_lora.run_id"] == first.run_id and meta["acestep_lora.alpha"] == "16"

    check(first, loras / "run.safetensors", torch.bfloat16)
    as_fp32 = train_lora(config(tiny_ckpt, tensors, tmp_path / "run", comfy_dtype="float32", **settings))
    check(as_fp32, loras / "run.safetensors", torch.float32)  # this run's file, replaced in the dtype asked for
    renamed = train_lora(config(tiny_ckpt, tensors, tmp_path / "run", lora_name="my style", comfy_dtype="float16",
                                trigger_tag="mystyle", **settings))
    check(renamed, loras / "my_style.safetensors", torch.float16)
    assert read_comfy_lora(str(loras / "my_style.safetensors"))[1]["acestep_lora.trigger_tag"] == "mystyle"
    assert renamed.trigger_tag == "mystyle" and renamed.steps == first.steps and "already trained" in renamed.log
    assert os.path.isfile(loras / "run.safetensors")  # the first name's file stays
    # What changes training is refused instead (the folder is kept as it is)
    with pytest.raises(FileExistsError, match="learning_rate 0.002 -> 0.001"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "run", learning_rate=1e-3, **settings))


def test_resume_from_a_state_that_is_not_ours_names_it(tiny_ckpt, tensors, tmp_path):
    train_lora(config(tiny_ckpt, tensors, tmp_path / "a", train_epochs=2, save_every_n_epochs=1))
    folder = tmp_path / "a" / "checkpoints" / "epoch_1"
    import collections
    torch.save({"format": 1, "counts": collections.Counter(a=1)}, folder / "training_state.pt")  # not loadable safely
    with pytest.raises(ValueError) as error:
        train_lora(config(tiny_ckpt, tensors, tmp_path / "b", resume_from=str(folder)))
    assert str(error.value).startswith(f"resume_from '{folder}': {folder / 'training_state.pt'} is not a training "
                                       "state this pack wrote, or it is damaged")
    assert "It was not executed" in str(error.value) and "Weights only load failed" not in str(error.value)


@pytest.mark.parametrize("change,pattern", [({"lora_rank": 16}, "lora_rank: checkpoint 8, now 16"),
                                            ({"target_modules": "q_proj,v_proj"}, "target_modules")])
def test_resume_with_other_rank_or_targets(tiny_ckpt, tensors, tmp_path, change, pattern):
    train_lora(config(tiny_ckpt, tensors, tmp_path / "a", train_epochs=2, save_every_n_epochs=1))
    with pytest.raises(ValueError, match=pattern):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoints" /
                                                                               "epoch_1"), **change))


def test_resume_latest_without_checkpoint(tiny_ckpt, tensors, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        train_lora(config(tiny_ckpt, tensors, tmp_path, resume_from="latest"))


# -- failures ----------------------------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_ckpt, tensors, tmp_path, monkeypatch):
    original = Trainer.loss
    calls = [0]

    def poisoned(self, batch):
        calls[0] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls[0] > 7 else loss

    monkeypatch.setattr(Trainer, "loss", poisoned)
    with pytest.raises(TrainingStopped, match="loss became nan.*Lower learning_rate.*epoch_2"):
        train_lora(config(tiny_ckpt, tensors, tmp_path, train_epochs=4, save_every_n_epochs=2))
    assert os.listdir(tmp_path / "checkpoints") == ["epoch_2"]
    state = torch.load(tmp_path / "checkpoints" / "epoch_2" / "training_state.pt", weights_only=True)
    assert all(math.isfinite(p[1]) for p in state["history"])
    assert not (tmp_path / "final").exists()


def test_out_of_memory_saves_and_names_the_knobs(tiny_ckpt, tensors, tmp_path, monkeypatch):
    original = Trainer.loss
    calls = [0]

    def oom(self, batch):
        calls[0] += 1
        if calls[0] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss", oom)
    with pytest.raises(TrainingStopped, match="out of cpu memory.*gradient_checkpointing.*batch_size.*max_duration"):
        train_lora(config(tiny_ckpt, tensors, tmp_path))
    assert any(d.startswith("cancelled_") for d in os.listdir(tmp_path / "checkpoints"))


def test_bad_inputs(tiny_ckpt, tensors, tmp_path):
    with pytest.raises(FileNotFoundError, match="tensor_dir .* does not exist"):
        train_lora(config(tiny_ckpt, str(tmp_path / "nope"), tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        train_lora(config(tiny_ckpt, str(empty), tmp_path / "o"))
    with pytest.raises(ValueError, match="batch_size 4 is larger than the dataset \\(3 samples\\)"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", batch_size=4))
    with pytest.raises(ValueError, match="target_modules: qproj not found.*Valid names: down_proj, gate_proj"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", target_modules="qproj"))
    with pytest.raises(ValueError, match="prepared with config_path 'acestep-v15-turbo'.*'acestep-v15-base'"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", config_path="acestep-v15-base"))
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", lora_rank=0))
    # a choice outside the option table's (the API and a hand-edited workflow bypass the dropdown)
    with pytest.raises(ValueError, match="comfy_dtype must be one of bfloat16, float16, float32 \\(got 'fp8'\\)"):
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", comfy_dtype="fp8"))
    with pytest.raises(ValueError, match="validation_split must be in \\[0, 0.5\\]"):  # before anything is loaded
        train_lora(config(tiny_ckpt, tensors, tmp_path / "o", validation_split=0.9))


def test_missing_tensor_file_named(tiny_ckpt, tensors, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tensors, copy)
    victim = json.load(open(copy / "manifest.json"))["samples"][0]
    os.remove(copy / victim)
    with pytest.raises(FileNotFoundError, match=f"'{victim}' listed in manifest.json is missing"):
        train_lora(config(tiny_ckpt, str(copy), tmp_path / "o"))


def test_mlp_targets_and_base_variant(tiny_ckpt, tmp_path):
    out = str(tmp_path / "t")
    prepare_dataset([item("a", 1.0)], out, PrepareSettings(tiny_ckpt, "acestep-v15-base", device="cpu"))
    result = train_lora(config(tiny_ckpt, out, tmp_path / "run", config_path="acestep-v15-base", train_epochs=2,
                               target_modules="q_proj,gate_proj,down_proj", save_every_n_epochs=0))
    tensors_, meta = read_comfy_lora(result.comfy_lora_path)
    assert meta["acestep_lora.timestep_sampling"] == "logit_normal" and meta["acestep_lora.variant"] == "base"
    assert any(".mlp.gate_proj.lora_A" in k for k in tensors_) and not any("k_proj" in k for k in tensors_)


def test_padded_batch_equals_samples_alone(tiny_ckpt):
    """With key-padding masks, each sample of a padded batch gets exactly its unpadded result."""
    decoder = load_dit(tiny_ckpt).decoder.eval()
    g = torch.Generator().manual_seed(0)
    lengths, tokens = [21, 14], [9, 5]
    xs = [torch.randn(n, 64, generator=g) for n in lengths]
    cs = [torch.randn(n, 128, generator=g) for n in lengths]
    es = [torch.randn(m, 64, generator=g) for m in tokens]
    t = torch.tensor([0.7, 0.3])

    def pad(seqs):
        return torch.stack([torch.nn.functional.pad(s, (0, 0, 0, max(len(x) for x in seqs) - len(s))) for s in seqs])

    frame_mask = torch.tensor([[1.0] * 21, [1.0] * 14 + [0.0] * 7])
    enc_mask = torch.tensor([[1.0] * 9, [1.0] * 5 + [0.0] * 4])
    with torch.no_grad():
        batch = decoder(hidden_states=pad(xs), timestep=t, timestep_r=t, attention_mask=frame_mask,
                        encoder_hidden_states=pad(es), encoder_attention_mask=enc_mask, context_latents=pad(cs),
                        mask_padding=True)[0]
        for i in range(2):
            alone = decoder(hidden_states=xs[i][None], timestep=t[i:i + 1], timestep_r=t[i:i + 1],
                            encoder_hidden_states=es[i][None], context_latents=cs[i][None])[0]
            assert torch.allclose(batch[i, :lengths[i]], alone[0], atol=1e-5)
        unmasked = decoder(hidden_states=pad(xs), timestep=t, timestep_r=t, encoder_hidden_states=pad(es),
                           context_latents=pad(cs))[0]
    assert not torch.allclose(unmasked[1, :14], batch[1, :14], atol=1e-4)  # the masks matter


def test_large_dataset_stays_on_host_and_trains(tiny_ckpt, tensors, tmp_path, monkeypatch):
    from acestep_lora import data as data_mod

    original = data_mod.TensorDataset.to
    monkeypatch.setattr(data_mod.TensorDataset, "to",
                        lambda self, device, dtype, max_device_bytes=0: original(self, torch.device("meta"), dtype,
                                                                                 max_device_bytes=0))
    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path))
    trainer.setup()
    assert trainer.data.staged_on_device is False and trainer.data.samples[0]["target_latents"].device.type == "cpu"
    batch = collate([trainer.data.samples[0]])
    assert batch.to(torch.device("cpu")).target_latents.device.type == "cpu"
    loss = trainer.step(batch)
    assert torch.isfinite(loss)
    assert all(bool(layer.lora_B.abs().sum() > 0) for layer in trainer.lora_layers.values())  # a step was taken


def test_auto_gradient_checkpointing_follows_the_model_family(tiny_ckpt, tensors, tmp_path, monkeypatch):
    """gradient_checkpointing = auto on a CUDA GPU decides from the memory estimate of the model being trained: on
    a card with 8 GiB usable, a 2B model's step fits without checkpointing, an XL model's (4.2 B parameters, 8.4 GB
    of bf16 weights) does not, even with it. Only the decision runs: nothing is put on the (absent) GPU."""
    from acestep_lora.compile import plan_step
    from acestep_lora.config import XL_FIELDS, AceStepConfig

    trainer = Trainer(config(tiny_ckpt, tensors, tmp_path / "gc", compile="off"))
    trainer.setup()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cuda = torch.device("cuda")
    for model_cfg, expected in ((AceStepConfig(), False), (AceStepConfig(**XL_FIELDS), True)):
        _, (reason, _) = plan_step(trainer.net, trainer.cfg, model_cfg, trainer.targets, trainer.data, cuda,
                                   torch.bfloat16)
        assert trainer.net.gradient_checkpointing is expected, (model_cfg.family, reason)
        assert reason.startswith(f"gradient checkpointing {'on' if expected else 'off'} (auto)")
        assert ("likely out of memory" in reason) is expected  # XL: 9.5 GiB even with checkpointing
    trainer.cfg.gradient_checkpointing = "off"
    plan_step(trainer.net, trainer.cfg, model_cfg, trainer.targets, trainer.data, cuda, torch.bfloat16)
    assert trainer.net.gradient_checkpointing is False


def test_the_trainer_stays_a_recipe_you_can_read():
    """New logic goes into its own module (compile.py, memory.py, ...) and is wired with a few lines."""
    import inspect

    from acestep_lora import train

    assert len(inspect.getsource(train).splitlines()) <= 350
    assert len(inspect.getsourcelines(train.Trainer)[0]) <= 300
