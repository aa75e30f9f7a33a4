"""`make demo`: the four nodes end to end, called through their ComfyUI-facing methods.

Create Training Sample x5 (chained) -> Collect Training Samples -> LoRA Prepare Training Data -> LoRA Train (with
audio previews, and one of the five songs held out for the validation loss), on
synthetic music and a tiny generated checkpoint, or on real weights when $ACESTEP_CHECKPOINT_DIR points to an
official ACE-Step 1.5 download. ComfyUI itself is replaced by the small stand-ins in scripts/headless.py; output
lands in demo_output/ (re-running reuses the samples and the cached tensors, and trains a new run).
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import headless  # noqa: E402
from synthetic_music import make_clip  # noqa: E402

CLIPS = [  # (caption, bpm given to the node (0 = detect), true bpm, style, key, lyrics)
    ("energetic rock, distorted guitars, punchy drums", 0, 128, "rock", "E minor", "[Instrumental]"),
    ("laid-back house groove, warm pads, four on the floor", 122, 122, "house", "A minor", "[Instrumental]"),
    ("gentle waltz, soft piano chords", 0, 96, "waltz", "F major", "[Instrumental]"),
    ("half-time hip hop beat, deep bass, sparse drums", 80, 80, "halftime", "C# minor",
     "[Verse]\nWalking through the city, lights are low,\nnowhere else to go"),
    ("sparse ambient groove, soft kick, airy pads", 104, 104, "sparse", "D major", "[Instrumental]"),
]


def main():
    import torch

    with torch.inference_mode():  # ComfyUI runs every node under inference mode; so does the demo
        run()


def run():
    out = os.path.join(ROOT, "demo_output")
    state = headless.install(os.path.join(out, "comfyui"))
    pack = headless.load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    real = os.environ.get("ACESTEP_CHECKPOINT_DIR")
    if real:
        ckpt = real
    else:
        import torch

        from acestep_lora.console import library_bars_off
        from acestep_lora.testing import make_tiny_checkpoint

        torch.set_num_threads(1)  # the tiny models gain nothing from threads; a busy CPU makes them spin-wait
        with library_bars_off():
            ckpt = make_tiny_checkpoint(os.path.join(out, "checkpoints"))
    seconds = float(os.environ.get("DEMO_SECONDS", 20 if real else 8))
    epochs = int(os.environ.get("DEMO_EPOCHS", 2 if real else 40))
    print(f"checkpoint: {ckpt} ({'official weights' if real else 'tiny generated checkpoint'})")
    started = time.time()

    # 1. Create Training Sample, chained so they run in order before Collect.
    create, previous = nodes["ACEStepLoRA_CreateTrainingSample"](), None
    for i, (caption, bpm, true_bpm, style, key, lyrics) in enumerate(CLIPS):
        waveform = make_clip(true_bpm, seconds, sample_rate=44100, seed=i, style=style)
        audio = {"waveform": waveform.unsqueeze(0), "sample_rate": 44100}  # what Load Audio outputs
        (previous,) = create.create(audio, caption, "demo/samples", lyrics=lyrics, bpm=bpm, keyscale=key,
                                    language="en" if lyrics != "[Instrumental]" else "instrumental",
                                    timesignature="3/4" if style == "waltz" else "4/4", previous=previous)
        info = json.loads(previous)
        print(f"1. sample {info['id']} ({info['status']}): bpm {info['bpm']} ({info['bpm_source']}, true {true_bpm})")

    # 2. Collect Training Samples.
    lists = nodes["ACEStepLoRA_CollectTrainingSamples"]().collect("demo/samples", sample_info=previous)
    audio_files, captions, lyrics_list, bpm_list, keyscale_list, language_list, timesignature_list = lists
    print(f"2. collected {len(json.loads(audio_files))} samples")

    # 3. LoRA Prepare Training Data.
    prepared = nodes["ACEStepLoRA_PrepareTrainingData"]().prepare(
        audio_files, captions, lyrics_list, bpm_list, keyscale_list, language_list, output_dir="demo/tensors",
        checkpoint_dir=ckpt, config_path="acestep-v15-turbo", device="auto", custom_tag="demostyle",
        tag_position="prepend", max_duration=240.0, timesignature_list=timesignature_list)
    tensor_dir, status = prepared["result"]
    print(f"3. {status}")

    # 4. LoRA Train (a new run folder each time; resume_from='latest' would continue one instead).
    run_dir = f"demo/runs/demo_{time.strftime('%Y%m%d_%H%M%S')}"
    trained = nodes["ACEStepLoRA_Train"]().train(
        tensor_dir=tensor_dir, checkpoint_dir=ckpt, config_path="acestep-v15-turbo", output_dir=run_dir,
        lora_rank=8 if not real else 64,
        lora_alpha=16 if not real else 128, lora_dropout=0.0, learning_rate=1e-3 if not real else 3e-4,
        train_epochs=epochs, batch_size=2, gradient_accumulation=1, save_every_n_epochs=max(1, epochs // 2),
        seed=42, resume_from="", target_modules="q_proj,k_proj,v_proj,o_proj",
        # previews with each checkpoint and at the end (shorter clips on the CPU), the validation loss every 5 epochs
        preview_seconds=20.0 if real else 10.0, validation_every_n_epochs=5)
    lora_info, _, previews = trained["result"]
    # Train printed its summary (where each file is) once; say what each file is for, without repeating it.
    print(f"4. trained {lora_info['epochs']} epochs, {lora_info['steps']} steps; final loss "
          f"{lora_info['final_loss']:.4f}")
    print("\nThe PEFT adapter is for kaola's ACE-Step nodes (lora_info) and the official app; the ComfyUI LoRA loads "
          "in LoraLoaderModelOnly at strength 1.0 (alpha baked in), as do the per-epoch files beside it; checkpoints "
          f"and train_log.jsonl are in {lora_info['output_dir']}.")
    # 5. The previews: what to listen to (Train's summary named the folder; here is each set, LoRA off first).
    run = lora_info["output_dir"]
    print(f"5. previews ({previews['waveform'].shape[0]} clips per set, {previews['waveform'].shape[-1] / 48000:g} s "
          f"each, 48 kHz FLAC) in {os.path.join(run, 'previews')}:")
    for entry in trained["ui"]["acestep_lora_previews"]:
        what = ("the model without the LoRA (A/B reference)" if entry["base"]
                else f"the LoRA after epoch {entry['epoch']}")
        print(f"   {what}: " + ", ".join(os.path.join(run, f) for f in entry["files"]))
    best = lora_info.get("best")
    if best:
        print(f"   lowest validation loss {best['validation_loss']:.4f} at epoch {best['epoch']}: {best['path']} "
              "(best/; hear it with: python -m acestep_lora sample --lora " + os.path.dirname(best["path"]) + " ...)")
    print(f"demo finished in {time.time() - started:.0f} s; {len(state.server.messages)} live chart messages sent")


if __name__ == "__main__":
    main()
