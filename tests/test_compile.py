"""The compiled decoder: one graph without breaks, one compile per length bucket, the eager results."""
import pytest
import torch

from acestep_lora import compile as compile_mod
from acestep_lora import lora
from acestep_lora.compile import CompiledDecoder
from acestep_lora.model import AceStepModel
from acestep_lora.testing import init_weights_, tiny_dit_config
from acestep_lora.train import TrainConfig, Trainer

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_decoder(layers=2, dropout=0.0):
    torch.manual_seed(0)
    model = AceStepModel(tiny_dit_config("turbo", num_hidden_layers=layers), components=("decoder",))
    init_weights_(model, 0)
    adapted = lora.inject(model.decoder, QKVO, 4, 8, dropout)
    for layer in adapted.values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model.decoder, adapted


def batch(frames, tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = len(frames)
    t = torch.rand(b, generator=g)
    kw = dict(hidden_states=torch.randn(b, max(frames), 64, generator=g), timestep=t, timestep_r=t,
              encoder_hidden_states=torch.randn(b, max(tokens), 64, generator=g),
              context_latents=torch.randn(b, max(frames), 128, generator=g))
    if b > 1:
        kw.update(mask_padding=True,
                  attention_mask=(torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).float(),
                  encoder_attention_mask=(torch.arange(max(tokens))[None] < torch.tensor(tokens)[:, None]).float())
    return kw


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_region_has_no_graph_breaks(checkpointing):
    decoder, _ = lora_decoder(dropout=0.1)  # training mode, LoRA dropout on
    decoder.gradient_checkpointing = checkpointing
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16)
    kw = batch([37, 30], [11, 7])
    explanation = torch._dynamo.explain(compiled._forward)(
        kw["hidden_states"], kw["timestep"], kw["timestep_r"], kw["encoder_hidden_states"], kw["context_latents"],
        torch.tensor([37, 30]), torch.tensor([11, 7]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_inductor_compiled_forward_equals_eager(monkeypatch):
    """inductor's generated kernels (C++ on a CPU; Triton on CUDA: tests/test_gpu.py), the suite's one inductor
    compile: one layer, forward only, scalar C++ (the compiler's time is the test's: ~20 kernels)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", False)
    decoder, _ = lora_decoder(layers=1)
    kw = batch([37], [11])
    torch._dynamo.reset()
    compiled = CompiledDecoder(decoder, frame_bucket=64, token_bucket=16)
    with torch.no_grad():
        out, eager = compiled(**kw)[0], decoder(**kw)[0]
    assert ((out - eager).norm() / eager.norm()).item() <= 1e-5


# -- the trainer's compile option (acestep_lora.compile.for_training) -------------------------------------------


@pytest.fixture(scope="module")
def varied_tensors(tiny_ckpt, tmp_path_factory):
    """Four prepared samples of 0.6 to 2.0 s (15 to 50 latent frames), conditions of different lengths."""
    from acestep_lora.prepare import PrepareSettings, prepare_dataset

    from test_prepare import item

    out = str(tmp_path_factory.mktemp("varied"))
    samples = [item("a", 1.0), item("b", 1.5, lyrics="la la, la\nla"), item("c", 0.6), item("d", 2.0, lyrics="oh")]
    prepare_dataset(samples, out, PrepareSettings(tiny_ckpt, device="cpu"))
    return out


def train_config(tiny_ckpt, tensors, out, **kw):
    base = dict(tensor_dir=tensors, checkpoint_dir=tiny_ckpt, output_dir=str(out), lora_rank=8, lora_alpha=16,
                lora_dropout=0.0, learning_rate=2e-3, train_epochs=1, save_every_n_epochs=0, warmup_steps=1,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_compiled_step_equals_eager(tiny_ckpt, varied_tensors, tmp_path, caplog, monkeypatch):
    """compile on trains what compile off trains, fp32: the same losses and LoRA weights after an epoch of padded
    batches of several lengths (bucket padding, lengths, AOT autograd's functionalised and partitioned forward and
    backward; inductor's kernels: test_inductor_compiled_forward_equals_eager, and on CUDA tests/test_gpu.py)."""
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    runs = {}
    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="acestep_lora"):
        for mode in ("on", "off"):
            trainer = Trainer(train_config(tiny_ckpt, varied_tensors, tmp_path / mode, compile=mode, batch_size=2))
            result = trainer.train()
            runs[mode] = ([loss for _, loss, *_ in result.history],
                          torch.cat([p.detach().flatten() for p in trainer.params]))
            assert isinstance(trainer.step_decoder, CompiledDecoder) == (mode == "on")
    (losses_on, weights_on), (losses_off, weights_off) = runs["on"], runs["off"]
    assert len(losses_on) == len(losses_off) == 2
    for a, b in zip(losses_on, losses_off):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert ((weights_on - weights_off).norm() / weights_off.norm()).item() <= 1e-5
    assert "step compiled (torch.compile): 1 step shape in this dataset" in caplog.text
    assert "step not compiled (as set)" in caplog.text and "gradient checkpointing off (auto: cpu)" in caplog.text


def test_recompiles_across_an_epoch_are_bounded_by_the_buckets(tiny_ckpt, varied_tensors, tmp_path, monkeypatch):
    """Two epochs of batches of varied lengths: one graph per (batch size, frame bucket) met, never more, and no
    more than for_training's bound; each graph complete (fullgraph=True: a graph break would raise)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        context = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == 128]
        graphs.append(tuple(context[0].shape[:2]))  # context_latents, padded: (B, frame bucket)
        return gm.forward

    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend)
    monkeypatch.setattr(compile_mod, "FRAME_BUCKET", 16)
    torch._dynamo.reset()
    trainer = Trainer(train_config(tiny_ckpt, varied_tensors, tmp_path, compile="on", batch_size=2, train_epochs=2,
                                   lora_dropout=0.1))
    trainer.setup()
    expected = set()
    original = compile_mod.CompiledDecoder.__call__

    def recording_call(self, hidden_states, *args, **kwargs):
        expected.add((hidden_states.shape[0], self.bucket(hidden_states.shape[1], 1)[0]))
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(compile_mod.CompiledDecoder, "__call__", recording_call)
    trainer.train()
    lengths = trainer.data.lengths
    assert len({-(-n // 16) for n in lengths}) == 4  # the samples span four buckets
    assert isinstance(trainer.step_decoder, compile_mod.CompiledDecoder) and graphs  # it did compile
    # the shapes met, bucketed independently of CompiledDecoder.bucket (frames rounded up to 16)
    assert {(b, f) for b, f in expected} <= {(b, -(-n // 16) * 16) for n in lengths for b in (1, 2)}
    assert sorted(graphs) == sorted(expected)  # one compile per shape met
    bound = len({-(-n // 16) for n in lengths})  # frame buckets x batch sizes (only 2: four samples)
    assert len(graphs) <= bound and f"{bound} step shapes" in trainer.header()


def test_compile_option_auto_on_off(monkeypatch):
    decoder, _ = lora_decoder(layers=1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    step, note = compile_mod.for_training(decoder, "auto", cpu, torch.float32, [30], [7], 1)
    assert step is decoder and note == "step not compiled (auto: compiled on CUDA only, this is cpu)"
    step, note = compile_mod.for_training(decoder, "off", cpu, torch.float32, [30], [7], 1, cuda_graphs=True)
    assert step is decoder and "cuda_graphs ignored" in note
    step, note = compile_mod.for_training(decoder, "on", cpu, torch.float32, [30, 300, 270], [7, 80], 2)
    assert isinstance(step, CompiledDecoder) and step.training_only and not step.fallback
    assert note.startswith("step compiled (torch.compile): 4 step shapes")  # buckets {1, 2} x batch sizes {2, 1}
    assert step.bucket(300, 80) == (500, 128) and step.bucket(30, 7) == (250, 128)  # one condition bucket
    monkeypatch.setattr(compile_mod, "compiler_missing", lambda device: "Triton is not installed (...)")
    with pytest.raises(ValueError, match="compile is 'on' but Triton is not installed.*set compile to auto or off"):
        compile_mod.for_training(decoder, "on", cuda, torch.bfloat16, [30], [7], 1)
    step, note = compile_mod.for_training(decoder, "auto", cuda, torch.bfloat16, [30], [7], 1)
    assert step is decoder and note == "step not compiled (Triton is not installed (...))"
    with pytest.raises(ValueError, match="compile 'yes' is not one of auto, on, off"):
        compile_mod.for_training(decoder, "yes", cpu, torch.float32, [30], [7], 1)


def test_a_failing_compile_falls_back_to_eager_in_auto_mode_and_evaluation_runs_eager(caplog):
    decoder, _ = lora_decoder(layers=1)
    kw = batch([37], [11])

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    with torch.no_grad():
        eager = decoder(**kw)[0]
        decoder.eval()  # evaluation (no autograd, eval mode): the eager decoder, nothing is compiled
        assert torch.equal(CompiledDecoder(decoder, backend=broken_backend, training_only=True)(**kw)[0],
                           decoder(**kw)[0])
        decoder.train()
    strict = CompiledDecoder(decoder, backend=broken_backend, training_only=True)
    with pytest.raises(Exception, match="no C\\+\\+ compiler found"):
        strict(**kw)
    lenient = CompiledDecoder(decoder, backend=broken_backend, training_only=True, fallback=True)
    with caplog.at_level("WARNING", logger="acestep_lora"):
        out = lenient(**kw)[0]
    assert torch.allclose(out, eager) and out.requires_grad  # trained on, uncompiled
    assert "torch.compile failed" in caplog.text and "no C++ compiler found" in caplog.text
    assert lenient.failed and torch.equal(lenient(**kw)[0], out)  # no second attempt
