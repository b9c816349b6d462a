"""Checks that need a GPU (skipped without one): the graphed and the eager GPU training steps
make no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), and search on CUDA
gives the CPU's results. (With a GPU, tests/models/test_step_graphs.py captures real graphs and
tests/nn/test_kernels.py runs the kernels on it.)"""

import pytest
import torch

from captioning.data.vocab import Vocabulary
from captioning.models.image_captioner import ImageCaptioner
from captioning.models.step_graphs import StepGraphs
from captioning.nn.encoders import SmallCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = Vocabulary(["a", "red", "blue", "circle", "square", "left", "of"]).to_dict()


def _model():
    torch.manual_seed(0)
    return ImageCaptioner(
        SmallCNN(channels=16, grid_size=4, width=4), VOCAB, embed_dim=8, decoder_dim=16, attention_dim=8, alpha_c=1.0
    ).cuda()


def _batch():
    captions = torch.tensor([[1, 4, 5, 6, 2, 0, 0, 0], [1, 4, 7, 8, 5, 6, 2, 0]]).cuda()
    return {"features": torch.randn(2, 16, 16, device="cuda"), "captions": captions}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_training_steps_never_synchronise(precision):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step(inputs):
        out = model.train_losses(inputs)
        out["loss"].backward()
        return out

    graphs = StepGraphs(step, opt, list(model.parameters()), clip=(5.0, "norm"), warmup=2)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(3):  # warm-up and capture
            graphs(_batch())
        batch = _batch()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                graphs(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert graphs.captures == 1 and graphs.replays >= 3


def test_the_eager_gpu_step_never_synchronises():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = _batch()
    for sync_mode in ("default", "error"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            opt.zero_grad(set_to_none=False)
            model.train_losses(batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 5.0, foreach=True)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_beam_search_on_cuda_equals_the_cpu():
    from captioning.nn.search import beam_search

    model = _model().eval()
    feats = torch.randn(4, 16, 16)
    with torch.no_grad():
        cpu = model.cpu().generate(feats, beam_size=3, max_length=10)
        gpu = model.cuda().generate(feats.cuda(), beam_size=3, max_length=10)
    assert torch.equal(cpu.tokens, gpu.tokens.cpu())
    torch.testing.assert_close(cpu.alphas, gpu.alphas.cpu(), atol=1e-4, rtol=1e-4)
    assert beam_search is not None
