"""Shared test settings: small thread count (2-core CI machines), W&B never online."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on shared cores
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CAPTIONING_OFFLINE", "1")
# Without a GPU the fused Triton kernels run through Triton's interpreter (tests/nn/test_kernels.py).
# Set before anything imports Triton (it decides how its own helpers are compiled at import).
if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from support import ROOT  # noqa: E402

# Tiny models: one thread is as fast, and no OpenMP spin-waits between threads when other
# processes share the 2 cores (several times slower). Subprocess tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A tiny shapes run through the CLI: a few seconds of training, enough for every command that
# needs a checkpoint of ours (caption, export, predict, ...).
TINY_SHAPES = [
    "--data.init_args.train_size",
    "64",
    "--data.init_args.val_size",
    "8",
    "--data.init_args.test_size",
    "8",
    "--data.init_args.batch_size",
    "16",
    "--trainer.max_epochs",
    "1",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.log_every_n_steps",
    "1",
    "--model.init_args.embed_dim",
    "16",
    "--model.init_args.decoder_dim",
    "32",
    "--model.init_args.attention_dim",
    "16",
    "--model.init_args.encoder.init_args.channels",
    "16",
    "--model.init_args.max_length",
    "8",
]


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory):
    """Run folder of ``captioning fit --config configs/shapes.yaml`` with a tiny model (test after fit)."""
    from captioning.commands.main import main

    root = tmp_path_factory.mktemp("shapes_run")
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/shapes.yaml"),
            *TINY_SHAPES,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
        ]
    )
    return root


# Where a run started from the checkout would write: no test may write there (tests use tmp_path).
_RUN_OUTPUTS = ("runs", "lightning_logs", "wandb", "overlays", "samples")


def _outputs_in_checkout() -> set[str]:
    found = set()
    for name in _RUN_OUTPUTS:
        top = ROOT / name
        if top.exists():
            found |= {p.relative_to(ROOT).as_posix() for p in [top, *top.glob("*"), *top.glob("*/*")]}
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_into_the_checkout():
    before = _outputs_in_checkout()
    yield
    new = sorted(_outputs_in_checkout() - before)
    assert not new, f"tests wrote into the checkout (use tmp_path): {new[:10]}"
