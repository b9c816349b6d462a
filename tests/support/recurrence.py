"""Checks that a decoder's fused recurrence gives what its plain step-by-step loop gives:
outputs and every gradient (the image and the text decoders, every score, query, sentinel)."""

import torch
import torch.nn.functional as F


def run_both(dec, feats, inputs, mask=None):
    """(outputs, parameter gradients, feature gradient) of the fused and of the plain loop, for
    a loss that weighs every output (logits, alphas, betas) so every backward path is used."""
    results = []
    for fused in (True, False):
        dec.fused = fused
        dec.zero_grad()
        f = feats.detach().clone().requires_grad_(True)
        out = dec(f, inputs, mask)
        g = torch.Generator().manual_seed(1)
        loss = sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in out if x is not None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}
        results.append((out, grads, f.grad))
    dec.fused = True
    return results


def assert_fused_equals_plain(dec, feats, inputs, mask=None):
    assert dec.uses_fused_recurrence
    (f_out, f_grads, f_feat), (p_out, p_grads, p_feat) = run_both(dec, feats, inputs, mask)
    for name, got, want in zip(p_out._fields, f_out, p_out):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")
    trained = {n for n, p in dec.named_parameters() if p.grad is not None}
    assert f_grads.keys() == p_grads.keys() == trained
    for name in p_grads:
        torch.testing.assert_close(f_grads[name], p_grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}")
    torch.testing.assert_close(f_feat, p_feat)  # a fine-tuned encoder gets the same gradient


def training_losses(dec, feats, captions, steps, lr):
    """Adam steps of teacher forcing on one batch -> the loss of each step."""
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = dec(feats, captions[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_bf16_autocast_close_to_fp32(dec, feats, inputs):
    """Forward (and backward) under bf16 autocast: finite gradients, logits and alphas near fp32."""
    ref = dec(feats, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dec(feats, inputs)
        low.logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dec.parameters())
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=0.05, rtol=0.05)
    torch.testing.assert_close(low.alphas.float(), ref.alphas, atol=0.02, rtol=0.05)
