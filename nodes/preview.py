"""The loss-curve image shown on the Train node while it runs (ComfyUI progress preview: works without any JS)."""
from __future__ import annotations

import math

from ..acestep_lora.metrics import format_seconds

WIDTH, HEIGHT, PAD = 512, 288, 36


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what TensorBoard's smoothing slider shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_chart(history: list, info: dict, validation: list = ()):
    """history: [[step, loss, lr], ...]; info: a ProgressEvent's message (step, total_steps, epoch, total_epochs,
    eta); validation: [[step, loss, epoch], ...] (held-out losses, drawn as green dots). Returns a PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (WIDTH, HEIGHT), (24, 26, 32))
    draw = ImageDraw.Draw(img)
    title = (f"step {info.get('step', 0)}/{info.get('total_steps', 0)}  epoch {info.get('epoch', 0)}/"
             f"{info.get('total_epochs', 0)}  ETA {format_seconds(info.get('eta'))}")
    draw.text((PAD, 8), title, fill=(220, 220, 220))
    left, top, right, bottom = PAD, PAD, WIDTH - 12, HEIGHT - 24
    draw.rectangle([left, top, right, bottom], outline=(80, 84, 96))
    points = [(p[0], p[1]) for p in history if math.isfinite(p[1])]
    if len(points) < 2:
        draw.text((left + 10, top + 10), "waiting for the first losses...", fill=(160, 160, 160))
        return img
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    smoothed = smooth(losses)
    held = [(v[0], v[1]) for v in validation if v[1] is not None and math.isfinite(v[1]) and v[0] >= steps[0]]
    lo, hi = min(losses + [v for _, v in held]), max(losses + [v for _, v in held])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, loss):
        return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (loss - lo) / (hi - lo) * (bottom - top))

    stride = max(1, len(points) // 1500)
    draw.line([xy(s, v) for s, v in zip(steps[::stride], losses[::stride])], fill=(90, 120, 170), width=1)
    draw.line([xy(s, v) for s, v in zip(steps[::stride], smoothed[::stride])], fill=(255, 170, 60), width=2)
    for s, v in held:
        x, y = xy(s, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(80, 200, 120))
    draw.text((left + 4, top + 2), f"{hi:.4f}", fill=(150, 150, 150))
    draw.text((left + 4, bottom - 14), f"{lo:.4f}", fill=(150, 150, 150))
    lr = history[-1][2] if len(history[-1]) > 2 else float("nan")
    draw.text((left, bottom + 6), f"loss {losses[-1]:.4f}  smoothed {smoothed[-1]:.4f}  lr {lr:.2e}",
              fill=(255, 170, 60))
    if held:
        draw.text((right - 150, bottom + 6), f"validation {held[-1][1]:.4f}", fill=(80, 200, 120))
    return img
