"""Our PEFT adapter folder loads in every PEFT from 0.12 on: no error, no warning, and the trained outputs.

PEFT 0.21's LoraConfig writes ~20 fields older PEFT does not know (0.12/0.13 raise "LoraConfig.__init__() got an
unexpected keyword argument 'alora_invocation_tokens'", 0.14-0.18 warn "Unexpected keyword arguments"), so
lora_io writes the field set PEFT 0.12 knows instead. Checked against the installed PEFT and, in a subprocess with a
test-only install first on sys.path, against old releases:
- 0.12.0: the oldest release kaola's nodes accept; 0.14.0: the first of the warning range; 0.18.0: the official
  app's minimum and the last of the warning range. All three import with the pinned transformers 5.24 / torch 2.9 /
  accelerate 1.15, so no older dependency is needed beside them. (0.16 and 0.17 import ``transformers.HybridCache``,
  which transformers 5 removed; testing them would need a transformers 4.x install beside them.)
- The releases are installed once with ``pip install --no-deps --target`` into ``$ACESTEP_LORA_PEFT_CACHE``
  (default ``<tmp>/acestep_lora_peft/<version>``); without a reachable package index those tests skip and say why.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from acestep_lora import load_dit, lora
from acestep_lora.lora_io import PEFT_CONFIG_FIELDS, PEFT_CONFIG_NAME

from conftest import ROOT

OLD_PEFT = ["0.12.0", "0.14.0", "0.18.0"]
TARGETS = ["k_proj", "o_proj", "q_proj", "v_proj"]
RANK, ALPHA, DROPOUT = 4, 8.0, 0.1


@pytest.fixture(scope="module")
def adapter(tiny_ckpt, tmp_path_factory):
    """A saved adapter with non-trivial weights, decoder inputs, and what our LoRA layers compute on them."""
    folder = str(tmp_path_factory.mktemp("peft") / "adapter")
    decoder = load_dit(tiny_ckpt, components=("decoder",)).decoder
    layers = lora.inject(decoder, TARGETS, RANK, ALPHA, DROPOUT)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
    lora.save_peft_adapter(folder, layers, TARGETS, RANK, ALPHA, DROPOUT)
    inputs = dict(hidden_states=torch.randn(1, 20, 64, generator=g), timestep=torch.tensor([0.5]),
                  timestep_r=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                  context_latents=torch.randn(1, 20, 128, generator=g))
    with torch.no_grad():
        expected = decoder.eval()(**inputs)[0]
        plain = load_dit(tiny_ckpt, components=("decoder",)).decoder(**inputs)[0]
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    io_path = os.path.join(os.path.dirname(folder), "io.safetensors")
    save_file(inputs, io_path)
    return folder, inputs, expected, io_path


def test_config_is_the_peft_012_field_set_and_written_without_peft(adapter, tmp_path, monkeypatch):
    folder = adapter[0]
    with open(os.path.join(folder, PEFT_CONFIG_NAME)) as f:
        config = json.load(f)
    assert set(config) == set(PEFT_CONFIG_FIELDS)
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["r"] == RANK and config["lora_alpha"] == 8 and config["lora_dropout"] == DROPOUT
    assert config["target_modules"] == TARGETS and config["bias"] == "none" and config["inference_mode"] is True

    monkeypatch.setitem(sys.modules, "peft", None)  # saving must not need PEFT at all
    layers = lora.inject(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)])}), ["0"], 2,
                         2.5, 0.0)
    lora.save_peft_adapter(str(tmp_path / "a"), layers, ["0"], 2, 2.5, 0.0)
    written = json.load(open(tmp_path / "a" / PEFT_CONFIG_NAME))
    assert written["lora_alpha"] == 2.5 and written["r"] == 2


def test_installed_peft_loads_it_without_warning(tiny_ckpt, adapter):
    from peft import PeftModel

    folder, inputs, expected, _ = adapter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_dit(tiny_ckpt, components=("decoder",)).decoder, folder).eval()
    assert [str(w.message) for w in caught] == []
    with torch.no_grad():
        out = model.get_base_model()(**inputs)[0]
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_the_old_peft_config_is_what_breaks_old_peft(tmp_path):
    """Guards the tests below: the file peft 0.21's LoraConfig writes carries fields PEFT 0.12 does not know."""
    from peft import LoraConfig

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="FEATURE_EXTRACTION").save_pretrained(
        str(tmp_path))
    written = set(json.load(open(tmp_path / PEFT_CONFIG_NAME)))
    assert "alora_invocation_tokens" in written and not written <= set(PEFT_CONFIG_FIELDS)


OLD_PEFT_SCRIPT = r"""
# One interpreter for every old release (torch and transformers are imported once): each release is put first on
# sys.path in turn, with the previous one's modules dropped. acestep_lora itself never imports peft.
import json, sys, warnings
folder, ckpt, io_path, out_dir, *installs = sys.argv[1:]
import torch
from safetensors.torch import load_file, save_file
from acestep_lora import load_dit

reports = {}
for install in installs:
    version, target = install.split("=", 1)
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        del sys.modules[name]
    sys.path.insert(0, target)
    import peft
    from peft import LoraConfig, PeftModel
    assert peft.__file__.startswith(target), peft.__file__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_dit(ckpt, components=("decoder",)).decoder, folder).eval()
    with torch.no_grad():
        out = model.get_base_model()(**load_file(io_path))[0].contiguous()
    save_file({"out": out}, f"{out_dir}/{version}.safetensors")
    # What this release's LoraConfig writes for the same settings (runtime-only runtime_config left out).
    written = json.load(open(folder + "/adapter_config.json"))
    cfg = LoraConfig(r=written["r"], lora_alpha=written["lora_alpha"], lora_dropout=written["lora_dropout"],
                     target_modules=written["target_modules"], bias="none", init_lora_weights=True,
                     task_type="FEATURE_EXTRACTION", inference_mode=True).to_dict()
    plain = lambda v: sorted(v) if isinstance(v, (set, list)) else (v.value if hasattr(v, "value") else v)
    reports[version] = {
        "version": peft.__version__, "warnings": [str(w.message)[:300] for w in caught],
        "unknown_to_this_version": sorted(set(written) - set(cfg)),
        "value_diff": {k: [str(plain(cfg[k])), str(written[k])] for k in written
                       if k in cfg and plain(cfg[k]) != written[k]}}
    sys.path.remove(target)
print(json.dumps(reports))
"""


def old_peft(version: str) -> tuple:
    """(folder holding only ``peft==version``, None), installed once then reused; (None, reason) when it cannot be
    installed."""
    cache = os.environ.get("ACESTEP_LORA_PEFT_CACHE") or os.path.join(tempfile.gettempdir(), "acestep_lora_peft")
    target = os.path.join(cache, version)
    if os.path.isfile(os.path.join(target, "peft", "__init__.py")):
        return target, None
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}.", dir=cache)
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--disable-pip-version-check", "--target", staging, f"peft=={version}"],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0 or not os.path.isfile(os.path.join(staging, "peft", "__init__.py")):
            return None, (f"could not install peft=={version} for this test (package index unreachable?): "
                          f"{(run.stderr or run.stdout).strip()[-300:]}")
        if not os.path.isdir(target):
            os.replace(staging, target)
        return target, None
    except subprocess.TimeoutExpired:
        return None, f"installing peft=={version} for this test timed out (package index unreachable?)"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="module")
def old_peft_reports(tiny_ckpt, adapter, tmp_path_factory):
    """{version: report or skip reason}: every old release loads the adapter in one subprocess."""
    folder, _, _, io_path = adapter
    installs, skipped = {}, {}
    for version in OLD_PEFT:
        target, reason = old_peft(version)
        (installs if target else skipped)[version] = target or reason
    if not installs:
        return {}, skipped, None
    out_dir = str(tmp_path_factory.mktemp("old_peft"))
    args = [f"{v}={t}" for v, t in installs.items()]
    run = subprocess.run([sys.executable, "-c", OLD_PEFT_SCRIPT, folder, tiny_ckpt, io_path, out_dir, *args],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), skipped, out_dir


@pytest.mark.parametrize("version", OLD_PEFT)
def test_old_peft_loads_it_without_error_or_warning(version, adapter, old_peft_reports):
    reports, skipped, out_dir = old_peft_reports
    if version in skipped:
        pytest.skip(skipped[version])
    report = reports[version]
    assert report["version"] == version
    assert report["warnings"] == []
    assert report["unknown_to_this_version"] == [] and report["value_diff"] == {}
    assert torch.allclose(load_file(os.path.join(out_dir, f"{version}.safetensors"))["out"], adapter[2], rtol=1e-5,
                          atol=1e-6)
