"""Shared fixtures: a tiny generated checkpoint (turbo + base DiT, VAE, text encoder) and the official fixture."""
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from acestep_lora.testing import make_tiny_checkpoint  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "acestep15_tiny")

# One thread: the tiny models gain nothing from more, and a busy machine makes OpenMP threads spin-wait.
torch.set_num_threads(1)


class _RootIsAFolderNotAPackage:
    """The repository root is a ComfyUI node pack: its ``__init__.py`` is the entry point ComfyUI loads as a package
    from ``custom_nodes/<folder>``. pytest would collect the root as a package too and import that file in setup,
    under a name made from the checkout folder: an ImportError wherever that name is not a Python identifier
    (``acestep-lora``, the name the README clones into), and the whole pack imported under a stray name elsewhere.
    Collected as a plain folder, the root ``__init__.py`` is only ever loaded the way ComfyUI loads it
    (``scripts/headless.py``), whatever the folder is called."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.isfile(os.path.join(path, "__init__.py")) and os.path.samefile(path, ROOT):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # A plugin rather than a conftest hook: conftest hooks only see paths below their own folder, not the root.
    if hasattr(pytest, "Dir"):  # pytest >= 8, as requirements-dev.txt asks
        config.pluginmanager.register(_RootIsAFolderNotAPackage(), "acestep-lora-root-folder")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A complete official-layout checkpoint folder with acestep-v15-turbo and acestep-v15-base."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), variants=["turbo", "base"])


@pytest.fixture(scope="module")
def six(tiny_ckpt, tmp_path_factory):
    """Six prepared samples (1.0-1.5 s): validation_split 0.1 holds out one."""
    from acestep_lora.prepare import PrepareSettings, prepare_dataset
    from test_prepare import item

    out = str(tmp_path_factory.mktemp("six"))
    prepare_dataset([item(n, 1.0 + 0.1 * i) for i, n in enumerate("abcdef")], out,
                    PrepareSettings(tiny_ckpt, device="cpu", custom_tag="mytag"))
    return out


SILENCE_PROBE = 48  # silence-latent probe frames for the tiny VAE (its edge effects span 7 frames)


@pytest.fixture(scope="session")
def comfy_official(tiny_ckpt, tmp_path_factory):
    """The tiny VAE and text encoder with a 2B- and an XL-shaped DiT folder (acestep-v15-turbo,
    acestep-v15-xl-turbo) at the official sliding window (a ComfyUI file cannot carry the tiny configs' window of
    8); each silence_latent.pt is the VAE's encoding of silence, as the official file is (the shared tiny
    fixture's is random), 300 frames long."""
    from acestep_lora import native
    from acestep_lora.testing import tiny_dit_config, write_dit
    from acestep_lora.vae import load_vae

    root = tmp_path_factory.mktemp("comfy_official")
    for name in ("vae", "Qwen3-Embedding-0.6B"):
        shutil.copytree(os.path.join(tiny_ckpt, name), root / name)
    write_dit(str(root / "acestep-v15-turbo"), tiny_dit_config("turbo", sliding_window=128), seed=4)
    write_dit(str(root / "acestep-v15-xl-turbo"), tiny_dit_config("xl-turbo", sliding_window=128), seed=5)
    silence = native.derive_silence_latent(load_vae(str(root)), frames=300, probe_frames=SILENCE_PROBE)
    for name in ("acestep-v15-turbo", "acestep-v15-xl-turbo"):
        torch.save(silence.transpose(1, 2).contiguous(), root / name / "silence_latent.pt")
    return str(root)


@pytest.fixture(scope="session")
def comfy_models(comfy_official, tmp_path_factory):
    """``comfy_official``'s weights as ComfyUI's files in one models folder: diffusion_models/acestep_v1.5_turbo
    and acestep_v1.5_xl_turbo, vae/ace_1.5_vae, text_encoders/qwen_0.6b_ace15, checkpoints/ace_step_1.5_turbo_aio
    and ace_step_1.5_xl_turbo_aio (.safetensors), and qwen25_tokenizer/ (the tokenizer folder ComfyUI ships)."""
    from acestep_lora.testing import make_tiny_comfy_models

    models = str(tmp_path_factory.mktemp("comfy_models"))
    for config_path in ("acestep-v15-turbo", "acestep-v15-xl-turbo"):
        make_tiny_comfy_models(models, comfy_official, config_path)
    return models


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory):
    """The official-implementation fixture laid out as a checkpoint folder (DiT under acestep-v15-turbo)."""
    root = tmp_path_factory.mktemp("official")
    dit = root / "acestep-v15-turbo"
    dit.mkdir()
    for name in ("config.json", "model.safetensors", "silence_latent.pt"):
        shutil.copy(os.path.join(FIXTURE, name), dit / name)
    shutil.copytree(os.path.join(FIXTURE, "vae"), root / "vae")
    return str(root)


@pytest.fixture()
def comfy(tmp_path, monkeypatch):
    """ComfyUI stand-ins rooted at tmp_path (output/, models/) and the pack imported as under custom_nodes/.

    Returns a namespace: .pack (the imported pack), .output, .models, .server (recorded send_sync messages),
    .interrupt() (press Cancel), .progress (recorded ProgressBar instances).
    """
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import headless

    state = headless.install(str(tmp_path / "comfyui"))
    monkeypatch.chdir(tmp_path)
    state.pack = headless.load_pack()
    state.interrupt = lambda: setattr(state, "interrupted", True)
    state.progress = headless.ProgressBar.instances
    state.InterruptProcessingException = headless.InterruptProcessingException
    return state


@pytest.fixture()
def pack_log(caplog):
    """The records the pack logs (``acestep_lora`` and below), whether or not console.install() has run."""
    import logging

    logger = logging.getLogger("acestep_lora")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="acestep_lora")
    yield caplog
    logger.removeHandler(caplog.handler)
