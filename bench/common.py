"""Shared benchmark helpers: random-weight models, synthetic tensor folders, analytic FLOPs, device facts.

Benchmarks measure the real engine code (acestep_lora.train.Trainer's step) on random weights, so they need no
download: full-size config on a CUDA GPU, the tiny config on a CPU (which says so in its output).
"""
from __future__ import annotations

import collections
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from acestep_lora.config import AceStepConfig  # noqa: E402
from acestep_lora.fileio import atomic_write_json  # noqa: E402
from acestep_lora.manifest import Manifest, SampleInfo  # noqa: E402
from acestep_lora.model import AceStepModel  # noqa: E402
from acestep_lora.testing import init_weights_, tiny_dit_config  # noqa: E402
from acestep_lora.train import Trainer  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16, SXM (the figure the official baseline's MFU column uses)
FRAMES_PER_SECOND = 25
ENCODER_LENGTH = 769  # the official preprocessing's padded condition length, for comparable rows


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device) -> float:
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device):
        return H100_BF16_PEAK_TFLOPS
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return H100_BF16_PEAK_TFLOPS
    return float("nan")


def write_config(checkpoint_dir: str, cfg: AceStepConfig, config_path: str = "acestep-v15-turbo") -> None:
    folder = os.path.join(checkpoint_dir, config_path)
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "config.json"), cfg.to_dict())


def write_tensor_dir(path: str, batch: int, frames, tokens: int, width: int,
                     config_path: str = "acestep-v15-turbo") -> str:
    """``batch`` synthetic samples as Prepare writes them: ``frames`` long each (an int: batches carry no padding),
    or ``frames[i]`` long (a list: unequal lengths, padded batches)."""
    lengths = list(frames) if isinstance(frames, (list, tuple)) else [frames] * batch
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    info = []
    for i, n in enumerate(lengths):
        data = {"target_latents": torch.randn(n, 64, generator=g),
                "attention_mask": torch.ones(n),
                "encoder_hidden_states": torch.randn(tokens, width, generator=g),
                "encoder_attention_mask": torch.ones(tokens, dtype=torch.bool),
                "context_latents": torch.cat([torch.randn(n, 64, generator=g), torch.ones(n, 64)], -1),
                "metadata": {"duration": n / FRAMES_PER_SECOND, "frames": n}}
        name = f"s{i}.pt"
        torch.save(data, os.path.join(path, name))
        seconds = n / FRAMES_PER_SECOND
        info.append(SampleInfo(file=name, name=f"synthetic_{i}", cache_key=f"synthetic-{i}-{n}-{tokens}",
                               duration_used=seconds, duration_total=seconds, frames=n, caption="synthetic"))
    Manifest(info, checkpoint={"config_path": config_path}, dtype="float32").save(path)
    return path


def random_model(trainer: Trainer) -> AceStepModel:
    """What the real Trainer trains (decoder + null condition), randomly initialised instead of read from disk."""
    with torch.device(trainer.device):
        model = AceStepModel(trainer.model_cfg, components=("decoder", "null_condition_emb")).to(trainer.dtype)
    if trainer.device.type == "cpu":
        init_weights_(model, seed=0)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
    return model.requires_grad_(False)


def training_tflops(cfg: AceStepConfig, batch: int, frames: int, tokens: int, rank: int, targets: list[str],
                    checkpointing: bool = False) -> float:
    """Analytic FLOPs of one training step (forward + backward), in TFLOP.

    Frozen base matmuls: forward + input-gradient = 2x their forward FLOPs (no weight gradient is needed).
    LoRA matmuls and attention score/value products: forward + both gradients = 3x. Gradient checkpointing
    recomputes the forward once more. Norms, activations and embeddings are ignored (<1 %).
    """
    h, hq, hkv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    length = -(-frames // cfg.patch_size)  # tokens after patching
    frozen = attn = lora = 0.0
    proj_shapes = {"self_attn.q_proj": (h, hq), "self_attn.k_proj": (h, hkv), "self_attn.v_proj": (h, hkv),
                   "self_attn.o_proj": (hq, h), "cross_attn.q_proj": (h, hq), "cross_attn.k_proj": (h, hkv),
                   "cross_attn.v_proj": (h, hkv), "cross_attn.o_proj": (hq, h), "mlp.gate_proj": (h, inter),
                   "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    for i in range(cfg.num_hidden_layers):
        window = cfg.window_for_layer(i)
        keys = length if window is None else min(length, 2 * window + 1)
        for name, (fan_in, fan_out) in proj_shapes.items():
            rows = tokens if name in ("cross_attn.k_proj", "cross_attn.v_proj") else length
            frozen += 2 * rows * fan_in * fan_out
            if name.split(".")[-1] in targets:
                lora += 2 * rows * rank * (fan_in + fan_out)
        attn += 4 * length * keys * hq + 4 * length * tokens * hq
    frozen += 2 * length * cfg.in_channels * cfg.patch_size * h + 2 * tokens * h * h + 2 * length * h * 64 * 2
    forward = frozen + attn + lora
    total = 2 * frozen + 3 * attn + 3 * lora + (forward if checkpointing else 0.0)
    return batch * total / 1e12


def make_trainer(workdir: str, cfg: AceStepConfig, batch: int, frames, tokens: int, rank: int, *,
                 checkpointing: str = "off", device: str = "auto", dtype=None, trainer_class=None,
                 build: bool = True, compile: str = "off", cuda_graphs: bool = False) -> Trainer:
    """The real Trainer on ``batch`` synthetic samples (``frames``: int or per-sample list, see write_tensor_dir).

    ``build=False`` returns it before ``setup()`` (model, optimizer, data staging), e.g. to set it up under
    FakeTensorMode with ``trainer.setup(model=random_model(trainer))``. ``compile`` / ``cuda_graphs``: the
    trainer's options (compile "on": the step as the trainer compiles it, acestep_lora.compile.for_training)."""
    from acestep_lora.train import TrainConfig

    ckpt = os.path.join(workdir, "ckpt")
    write_config(ckpt, cfg)
    tag = "_".join(map(str, frames)) if isinstance(frames, (list, tuple)) else frames
    tensors = write_tensor_dir(os.path.join(workdir, f"t_{batch}_{tag}"), batch, frames, tokens,
                               cfg.encoder_hidden_size or cfg.hidden_size)
    tc = TrainConfig(tensor_dir=tensors, checkpoint_dir=ckpt, output_dir=os.path.join(workdir, f"run_{time.time_ns()}"),
                     lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.1, batch_size=batch, train_epochs=10 ** 6,
                     save_every_n_epochs=0, gradient_checkpointing=checkpointing, device=device, compile=compile,
                     cuda_graphs=cuda_graphs)
    trainer = (trainer_class or Trainer)(tc)
    if dtype is not None:  # e.g. bf16 autocast on a CPU, to mirror the CUDA code path
        trainer.dtype = dtype
    if build:
        trainer.setup(model=random_model(trainer))
        mirror_cuda_readback(trainer)
    os.makedirs(tc.output_dir, exist_ok=True)
    return trainer


def mirror_cuda_readback(trainer: Trainer) -> None:
    """Read losses back every ``log_every`` steps as on CUDA, not every step as on the CPU (a host sync that fake
    tensors cannot do and that a CUDA step never does)."""
    trainer.metrics.read_every_step = False
    trainer.metrics.log_every = 10 ** 9


def train_step(trainer: Trainer) -> None:
    """One optimizer step exactly as the engine runs it (sample noise/t, forward, backward, clip, AdamW)."""
    from acestep_lora.data import collate

    trainer.step(collate(trainer.data.samples))


def full_config() -> AceStepConfig:
    return AceStepConfig()


def cpu_config() -> AceStepConfig:
    return tiny_dit_config("turbo")


def record(results_path: str, title: str, command: str, table: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = time.strftime("%Y-%m-%d")
    with open(results_path, "a", encoding="utf-8") as f:
        f.write(f"\n### {title} — {stamp}\n\nDevice: {device_name()}; torch {torch.__version__}\n\n"
                f"Command: `{command}`\n\n{table}\n")


def dump_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# A model of what the CUDA build dispatches, for measurements taken on a CPU under FakeTensorMode
#
# CPU autocast, dropout and rms_norm take other code paths than CUDA, and PyTorch's SDPA picks its CUDA kernel at
# run time. ``CudaDispatch`` makes each CUDA choice explicit, so a fake-tensor run on a CPU saves for backward, and
# launches, what the CUDA step would:
# - autocast: CPU autocast already casts matmuls/convs/SDPA to bf16 like CUDA autocast; CUDA autocast also runs
#   the functions below in fp32 (ATen autocast_mode.cpp, CUDA "fp32" and "fp32_set_opt_dtype" lists);
# - dropout: CUDA runs ``native_dropout`` (one kernel, a bool mask kept for backward), CPU a bernoulli + div + mul
#   (F.dropout, and acestep_lora.model's own dropout through NATIVE_DROPOUT_DEVICES);
# - rms_norm: CUDA runs ``_fused_rms_norm`` (one kernel, keeps input and fp32 rstd), CPU a decomposition;
# - scaled_dot_product_attention: the backend is named ("flash", "efficient", "math", or "auto" = what torch 2.9.1
#   with its bundled cuDNN 9.8 picks on an A100/H100: flash if there is no mask, else efficient if the head counts
#   are equal, else math), and the CUDA composite's mask handling is reproduced (bool -> additive, last dimension
#   padded to the memory-efficient kernel's 8-element alignment).
# Values are not computed (the fused rms_norm returns uninitialised memory): use it under FakeTensorMode.

CUDA_FP32_FUNCTIONS = {"exp", "log", "log2", "log10", "pow", "rsqrt", "reciprocal", "softmax", "log_softmax",
                       "mse_loss", "layer_norm", "l1_loss", "smooth_l1_loss"}
CUDA_FP32_REDUCTIONS = {"sum", "prod", "cumsum", "cumprod"}
MEM_EFFICIENT_BIAS_ALIGNMENT = 8  # elements (aten/src/ATen/native/transformers/attention.cpp, preprocess_mask)


class _FusedRMSNorm(torch.autograd.Function):
    """aten::_fused_rms_norm as CUDA runs it: one kernel; input and fp32 rstd saved; fused backward."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        dims = len(normalized_shape)
        rstd = x.new_empty(x.shape[:-dims] + (1,) * dims, dtype=torch.float32)
        ctx.save_for_backward(x, rstd, weight)
        ctx.normalized_shape = list(normalized_shape)
        CudaDispatch.virtual_launch("_fused_rms_norm")
        if not x.is_contiguous():  # the kernel runs on a contiguous copy of its input
            CudaDispatch.virtual_launch("contiguous (rms_norm input)")
        dtype = x.dtype if weight is None else torch.result_type(x, weight)
        return torch.empty(x.shape, dtype=dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        needs_weight = weight is not None and ctx.needs_input_grad[2]
        dx, dw = torch.ops.aten._fused_rms_norm_backward(grad, x, ctx.normalized_shape, rstd, weight,
                                                         [ctx.needs_input_grad[0], needs_weight])
        return dx, None, dw, None


def _padded_bias(bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The CUDA SDPA composite's preprocess_mask: pad the last dim to the kernel's alignment, then expand."""
    aligned = all(s % MEM_EFFICIENT_BIAS_ALIGNMENT == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1
    if not aligned:
        length = bias.shape[-1]
        pad = MEM_EFFICIENT_BIAS_ALIGNMENT - length % MEM_EFFICIENT_BIAS_ALIGNMENT
        bias = torch.nn.functional.pad(bias, (0, pad))[..., :length]
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


class CudaDispatch(torch.overrides.TorchFunctionMode):
    """Route the functions whose CUDA code path differs from the CPU one to their CUDA ATen kernels (see above)."""

    launches = None  # collections.Counter of kernels the emulation launches without a matching ATen call

    def __init__(self, sdpa_backend: str = "auto"):
        super().__init__()
        self._dropout_devices = None
        if sdpa_backend not in ("auto", "flash", "efficient", "math"):
            raise ValueError(f"sdpa_backend '{sdpa_backend}' is not auto, flash, efficient or math")
        self.sdpa_backend = sdpa_backend
        self.sdpa_choices = collections.Counter()

    def __enter__(self):
        from acestep_lora import model  # the model's own dropout takes the CUDA path (native_dropout, bool mask)

        self._dropout_devices = getattr(model, "NATIVE_DROPOUT_DEVICES", None)
        if self._dropout_devices is not None:
            model.NATIVE_DROPOUT_DEVICES = self._dropout_devices + ("cpu",)
        return super().__enter__()

    def __exit__(self, *exc):
        from acestep_lora import model

        if self._dropout_devices is not None:
            model.NATIVE_DROPOUT_DEVICES = self._dropout_devices
        return super().__exit__(*exc)

    @classmethod
    def virtual_launch(cls, name: str) -> None:
        if cls.launches is not None:
            cls.launches[name] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        F = torch.nn.functional
        if func is F.rms_norm:
            x, shape = args[0], args[1]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            eps = args[3] if len(args) > 3 else kwargs.get("eps")
            return _FusedRMSNorm.apply(x, tuple(shape), weight, eps)
        if func is F.dropout:
            x = args[0]
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            if p == 0 or not training or x.numel() == 0:
                return x
            return torch.ops.aten.native_dropout(x, p, True)[0]
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is torch.Tensor.backward:
            tensor, gradient = args[0], args[1] if len(args) > 1 else kwargs.get("gradient")
            with self:  # a mode is off while its handler runs: keep it on for checkpointing's recomputation
                return torch.autograd.backward(tensor, gradient, kwargs.get("retain_graph"),
                                               kwargs.get("create_graph", False), inputs=kwargs.get("inputs"))
        name = getattr(func, "__name__", "")
        if torch.is_autocast_enabled("cpu") and name in CUDA_FP32_FUNCTIONS | CUDA_FP32_REDUCTIONS:
            low = (torch.bfloat16, torch.float16)
            if name in CUDA_FP32_REDUCTIONS:
                if isinstance(args[0], torch.Tensor) and args[0].dtype in low and kwargs.get("dtype") is None:
                    kwargs = dict(kwargs, dtype=torch.float32)
            else:
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a for a in args)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        backend = self.sdpa_backend
        grouped = enable_gqa and query.shape[1] != key.shape[1]
        if backend == "auto":
            backend = "flash" if attn_mask is None else ("math" if grouped else "efficient")
        if backend == "efficient" and grouped:
            raise RuntimeError("the memory-efficient SDPA kernel does not take unequal head counts")
        if backend == "flash" and attn_mask is not None:
            raise RuntimeError("the flash SDPA kernel takes no attention mask")
        if torch.is_autocast_enabled("cpu"):  # SDPA is on the lower-precision list of both autocasts
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(dtype) if t.dtype == torch.float32 else t for t in (query, key, value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # convert_boolean_attn_mask
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(
                ~attn_mask, float("-inf"))
        self.sdpa_choices[backend] += 1
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        if backend == "efficient":
            bias = None if attn_mask is None else _padded_bias(attn_mask.to(query.dtype), query, key)
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, query.requires_grad, dropout_p, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                                 None, scale=scale, enable_gqa=enable_gqa)[0]
