"""Command line: the same core the nodes call.

    python -m acestep_lora prepare --samples-dir songs/ --output tensors/ --checkpoint-dir checkpoints/
    python -m acestep_lora train --tensor-dir tensors/ --checkpoint-dir checkpoints/ --output-dir runs/my_lora
    python -m acestep_lora tiny-checkpoint demo_checkpoints/
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .checkpoint import DEFAULT_CONFIG_PATH
from .train import DEFAULT_TARGETS, TIMESTEP_SAMPLING


def _prepare(args) -> int:
    from .prepare import PrepareItem, PrepareSettings, prepare_dataset
    from .samples import collect_samples

    samples = collect_samples(args.samples_dir)
    items = [PrepareItem(name=s.audio_path, path=s.audio_path, caption=s.caption, lyrics=s.lyrics, bpm=s.bpm,
                         keyscale=s.keyscale, language=s.language, timesignature=s.timesignature) for s in samples]
    settings = PrepareSettings(checkpoint_dir=args.checkpoint_dir, config_path=args.config_path, device=args.device,
                               custom_tag=args.custom_tag, tag_position=args.tag_position,
                               max_duration=args.max_duration)
    result = prepare_dataset(items, args.output, settings,
                             progress=lambda done, total, msg: print(f"[{done}/{total}] {msg}", flush=True))
    print(result.status)
    return 0


def _train(args) -> int:
    from .train import TrainConfig, train_lora

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    result = train_lora(cfg)
    print(f"PEFT adapter: {result.adapter_dir}\nComfyUI LoRA: {result.comfy_lora_path}")
    return 0


def _tiny(args) -> int:
    from .testing import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.path, variants=args.variants))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m acestep_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="encode a folder of samples into training tensors")
    p.add_argument("--samples-dir", required=True, help="audio files with .json/.txt sidecars (or Create's output)")
    p.add_argument("--output", required=True, help="tensor folder to write")
    p.add_argument("--checkpoint-dir", required=True)
    p.add_argument("--config-path", default=DEFAULT_CONFIG_PATH)
    p.add_argument("--device", default="auto")
    p.add_argument("--custom-tag", default="")
    p.add_argument("--tag-position", default="append", choices=["append", "prepend", "replace"])
    p.add_argument("--max-duration", type=float, default=240.0)
    p.set_defaults(run=_prepare)

    t = sub.add_parser("train", help="train a LoRA on prepared tensors")
    t.add_argument("--tensor-dir", dest="tensor_dir", required=True)
    t.add_argument("--checkpoint-dir", dest="checkpoint_dir", required=True)
    t.add_argument("--output-dir", dest="output_dir", required=True)
    t.add_argument("--config-path", dest="config_path", default=DEFAULT_CONFIG_PATH)
    t.add_argument("--rank", dest="lora_rank", type=int, default=64)
    t.add_argument("--alpha", dest="lora_alpha", type=float, default=128.0)
    t.add_argument("--dropout", dest="lora_dropout", type=float, default=0.1)
    t.add_argument("--lr", dest="learning_rate", type=float, default=3e-4)
    t.add_argument("--epochs", dest="train_epochs", type=int, default=1000)
    t.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    t.add_argument("--grad-accum", dest="gradient_accumulation", type=int, default=1)
    t.add_argument("--save-every", dest="save_every_n_epochs", type=int, default=200)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--resume-from", dest="resume_from", default="")
    t.add_argument("--target-modules", dest="target_modules", default=DEFAULT_TARGETS)
    t.add_argument("--timestep-sampling", dest="timestep_sampling", default="auto", choices=TIMESTEP_SAMPLING)
    t.add_argument("--cfg-dropout", dest="cfg_dropout", type=float, default=0.15)
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", default="auto",
                   choices=["auto", "on", "off"])
    t.add_argument("--lora-name", dest="lora_name", default="")
    t.add_argument("--loras-dir", dest="loras_dir", default=None, help="where the ComfyUI file goes")
    t.add_argument("--device", default="auto")
    t.set_defaults(run=_train)

    k = sub.add_parser("tiny-checkpoint", help="write a tiny official-layout checkpoint (tests, demos)")
    k.add_argument("path")
    k.add_argument("--variants", nargs="+", default=["turbo"], choices=["turbo", "base", "sft"])
    k.set_defaults(run=_tiny)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
