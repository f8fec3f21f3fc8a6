import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory):
    """A small rendered shapes dataset at 16 px, shared by the session."""
    from datamodules.shapes import write_shapes_shards

    root = str(tmp_path_factory.mktemp("shapes16"))
    write_shapes_shards(root, resolution=16, num_train=600, num_val=64, seed=0, shard_size=100)
    return root


def block_images(n: int = 4, size: int = 16, seed: int = 0):
    """``n`` distinct images: a coloured 8 x 8 block on black, each at its own corner and colour."""
    import torch

    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=torch.float)
    x = -torch.ones(n, 3, size, size)
    half = size // 2
    for i in range(n):
        r, c = (i // 2 % 2) * half, (i % 2) * half
        x[i, :, r : r + half, c : c + half] = colours[i % 4].view(3, 1, 1)
    return x


BLOCK_CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


@pytest.fixture(scope="session")
def tiny_autoencoders(tmp_path_factory):
    """Checkpoints of a tiny VQ autoencoder (K = 32, f4: 4 x 4 tokens of 16 px images) and a tiny
    KL autoencoder (4 channels, f4), each trained briefly on the four block images."""
    import torch
    from torch.utils.data import DataLoader

    from lightning_modules.autoencoder import KLAutoencoder, VQAutoencoder
    from networks.autoencoder import Decoder, Encoder
    from networks.quantizer import VectorQuantizer

    root = tmp_path_factory.mktemp("autoencoders")
    x = block_images()
    loader = DataLoader([{"image": x, "caption": list(BLOCK_CAPTIONS)}] * 150, batch_size=None)
    paths = {}
    for kind in ("vq", "kl"):
        torch.manual_seed(0)
        latent = 8 if kind == "vq" else 4
        enc = Encoder(
            channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            out_channels=latent * (1 if kind == "vq" else 2),
        )
        dec = Decoder(in_channels=latent, channels=16, channel_mult=(1, 2, 2), num_res_blocks=1)
        opt = lambda p: torch.optim.Adam(p, lr=3e-3)  # noqa: E731
        if kind == "vq":
            q = VectorQuantizer(32, dim=8, cosine=True, ema=True, dead_code_threshold=0.5)
            model = VQAutoencoder(enc, dec, q, image_size=16, optimizer=opt)
        else:
            model = KLAutoencoder(enc, dec, latent_channels=4, image_size=16, optimizer=opt)
        paths[kind] = fit_and_save(model, loader, 150, str(root / f"{kind}.ckpt"))
    return paths


def fit_and_save(model, loader, steps: int, path: str) -> str:
    """Train ``model`` for ``steps`` steps on ``loader`` (no logger, no validation) and save a
    checkpoint at ``path``, as the CLI would; returns ``path``."""
    import lightning as L
    import torch

    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    trainer.fit(model, loader)
    trainer.save_checkpoint(path)
    from lightning_modules.base import TextToImageModule

    if isinstance(model, TextToImageModule):  # the CLI records the class (load_method reads it)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["hyper_parameters"]["_class_path"] = f"{type(model).__module__}.{type(model).__name__}"
        torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def tiny_methods(tmp_path_factory):
    """Checkpoints of three tiny 16 px models on the four block images: a CLIP (trained until the
    four block captions retrieve their images), a conditional VAE and a StackGAN stage I (methods
    of two families; barely trained, as a stochastic generator needs to be for the tests)."""
    import torch
    from torch.utils.data import DataLoader

    from lightning_modules.clip import CLIP
    from lightning_modules.cvae import ConditionalVAE
    from lightning_modules.gan import TextToImageGAN
    from networks.clip import ImageTower
    from networks.cvae import ConditionalVAENet
    from networks.stackgan import MatchingAwareDiscriminator, StageIGenerator
    from networks.text_encoders import TransformerTextEncoder

    def loader(steps):
        return DataLoader(
            [{"image": block_images(), "caption": list(BLOCK_CAPTIONS)}] * steps, batch_size=None
        )

    def text():
        return TransformerTextEncoder(width=32, depth=1, heads=2, max_length=16, tokenizer="byte")

    root = tmp_path_factory.mktemp("tiny_methods")
    torch.manual_seed(0)
    image = ImageTower(image_size=16, channels=8, channel_mult=(1, 2, 2), feature_channels=8, width=32)
    clip = CLIP(
        image, text(), embed_dim=16, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0)
    )
    paths = {"clip": fit_and_save(clip, loader(120), 120, str(root / "clip.ckpt"))}
    torch.manual_seed(0)
    net = ConditionalVAENet(image_size=16, text_dim=32, latent_dim=8, channels=16, hidden=64)
    cvae = ConditionalVAE(net, text(), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    paths["cvae"] = fit_and_save(cvae, loader(20), 20, str(root / "cvae.ckpt"))
    torch.manual_seed(0)
    gan = TextToImageGAN(StageIGenerator(32, image_size=16, z_dim=8, cond_dim=8, channels=16),
                         [MatchingAwareDiscriminator(32, image_size=16, channels=8, cond_dim=8)], text())  # fmt: skip
    paths["gan"] = fit_and_save(gan, loader(4), 4, str(root / "gan.ckpt"))
    return paths


def run_processes(cmd, timeout: float, retries: int = 0, **kw):
    """``subprocess.run`` in a session of its own, so that a timeout kills every process it started
    (DDP ranks, data-loader workers), not only the first one, whose orphans would hold the output
    pipes open. With ``retries``, a run that times out is started again, with a warning that says so.

    Two gloo processes started by Lightning on this 2-core machine hung about once in 60 runs
    (rank 0 waiting in the TCP store's rendezvous while rank 1 ran on); the retry keeps that rare
    start-up hang from failing tests that check something else.
    """
    import signal
    import subprocess
    import warnings

    for attempt in range(retries + 1):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kw)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if attempt == retries:
                raise AssertionError(
                    f"{cmd} timed out after {timeout} s; its stderr ends:\n{err[-3000:]}"
                ) from None
            warnings.warn(f"{cmd} timed out after {timeout} s and was started again; stderr ended:\n{err[-1000:]}",
                          stacklevel=2)  # fmt: skip
