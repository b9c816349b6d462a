"""The image captioning LightningModule: loss, optimisation, decoding for metrics, logging.

The maths lives in plain modules (encoder, :class:`ShowAttendTellDecoder`, search); this
class wires them, computes the loss with padding masked out, and scores validation/test
by real decoding (beam or greedy), never teacher forcing.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioning.decoders import ShowAttendTellDecoder
from captioning.distributed import gather_unique
from captioning.encoders import Encoder, encoder_config
from captioning.search import SearchResult, beam_search, greedy_search
from captioning.vocab import Vocabulary


class ImageCaptioner(pl.LightningModule):
    """Show, Attend and Tell captioner.

    Args:
        encoder: a :class:`captioning.encoders.Encoder`: images (B, 3, H, W) -> features
            (B, S, C); it states its preprocessing, which the datamodule and ``caption`` follow.
        vocab: the vocabulary as plain data ({"itos": [...]}) — linked from the datamodule
            by the CLI and stored in the checkpoint.
        attention: score function or ``"none"`` (mean-feature baseline); num_heads > 1 for
            multi-head. embed_dim, decoder_dim, attention_dim, dropout, gate: decoder sizes.
        alpha_c: weight of the doubly stochastic attention regulariser.
        lr, encoder_lr, weight_decay: AdamW; encoder_lr applies to trainable encoder params.
        scheduler: "none", "cosine" (linear warmup then cosine decay per step) or "plateau"
            (halve the learning rate when val/cider stops improving).
        beam_size: 1 = greedy; used for validation, test and predict.
        max_length, length_penalty: decoding limits.
        label_smoothing: cross-entropy label smoothing.
        compile_decoder: torch.compile the decoder step (GPU speed option).
        allow_unk: let decoding emit ``<unk>`` (default: never; the next likeliest word is
            used), for validation, test, predict and ``caption``.
    """

    def __init__(self, encoder: Encoder, vocab: dict | None = None, attention: str = "additive",
                 num_heads: int = 1, embed_dim: int = 512, decoder_dim: int = 512, attention_dim: int = 512,
                 dropout: float = 0.5, gate: bool = True, alpha_c: float = 1.0, lr: float = 4e-4,
                 encoder_lr: float = 1e-4, weight_decay: float = 0.0, scheduler: str = "none",
                 warmup_steps: int = 0, beam_size: int = 3, max_length: int = 30, length_penalty: float = 0.0,
                 label_smoothing: float = 0.0, compile_decoder: bool = False, allow_unk: bool = False) -> None:
        super().__init__()
        if vocab is None:
            raise ValueError("ImageCaptioner needs a vocabulary: the CLI links it from the datamodule "
                             "(data.vocab); in Python pass vocab=datamodule.vocab.to_dict()")
        if scheduler not in ("none", "cosine", "plateau"):
            raise ValueError(f"scheduler must be 'none', 'cosine' or 'plateau', got {scheduler!r}")
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = encoder_config(encoder)
        self.vocab = Vocabulary.from_dict(vocab)
        self.encoder = encoder
        self.grid_size = int(getattr(encoder, "grid_size"))
        self.decoder = ShowAttendTellDecoder(
            len(self.vocab), encoder.out_channels, embed_dim, decoder_dim, attention_dim, attention=attention,
            num_heads=num_heads, gate=gate, dropout=dropout, max_positions=self.grid_size ** 2)
        self._eval_outputs: list[dict] = []

    @property
    def preprocessing(self):
        """The encoder's :class:`captioning.images.Preprocessing` (input size, mean/std)."""
        return self.encoder.preprocessing

    def setup(self, stage: str) -> None:
        if self.hparams.compile_decoder:
            compile_decoder_step(self.decoder)

    # ------------------------------------------------------------------ core
    def encode(self, batch: dict) -> Tensor:
        """Batch -> features (B, S, C); uses cached features when the batch carries them.
        ``batch["images"]``: (B, 3, H, W) uint8 at the encoder's input size (it normalises)."""
        if "features" in batch:
            return batch["features"].to(self.dtype if self.dtype.is_floating_point else torch.float32)
        return self.encoder(batch["images"])

    def loss(self, features: Tensor, captions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced loss. captions (B, L) = BOS w.. EOS PAD.. -> (total, cross-entropy, regulariser)."""
        inputs, targets = captions[:, :-1], captions[:, 1:]
        out = self.decoder(features, inputs)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=self.vocab.pad_id, label_smoothing=self.hparams.label_smoothing)
        if self.decoder.attention is None or self.hparams.alpha_c == 0:
            reg = ce.new_zeros(())
        else:
            # Doubly stochastic attention: every cell should receive ~1 unit of attention
            # over the caption (padding steps excluded).
            valid = (targets != self.vocab.pad_id).unsqueeze(-1).to(out.alphas.dtype)  # (B, T, 1)
            reg = self.hparams.alpha_c * ((1.0 - (out.alphas * valid).sum(1)) ** 2).mean()
        return ce + reg, ce, reg

    def banned_ids(self, allow_unk: bool | None = None) -> list[int]:
        """Tokens decoding never emits: BOS and PAD always, ``<unk>`` unless allowed."""
        allow = self.hparams.get("allow_unk", False) if allow_unk is None else allow_unk
        return [self.vocab.bos_id, self.vocab.pad_id] + ([] if allow else [self.vocab.unk_id])

    @torch.no_grad()
    def generate(self, features: Tensor, beam_size: int | None = None, max_length: int | None = None,
                 allow_unk: bool | None = None) -> SearchResult:
        """Decode captions for features (B, S, C); beam_size 1 = greedy; ``<unk>`` per :meth:`banned_ids`."""
        beam = self.hparams.beam_size if beam_size is None else beam_size
        length = self.hparams.max_length if max_length is None else max_length
        memory = self.decoder.prepare_memory(features)
        common = dict(bos_id=self.vocab.bos_id, eos_id=self.vocab.eos_id, pad_id=self.vocab.pad_id, max_length=length,
                      banned_ids=self.banned_ids(allow_unk))
        if beam <= 1:
            return greedy_search(self.decoder, memory, features.shape[0], **common)
        return beam_search(self.decoder, memory, features.shape[0], beam_size=beam,
                           length_penalty=self.hparams.length_penalty, **common)

    def _caption_length(self, row: Tensor) -> int:
        """Number of generated words before EOS (special tokens mid-caption included, so
        words and attention maps stay aligned)."""
        ids = row.tolist()
        return ids.index(self.vocab.eos_id) if self.vocab.eos_id in ids else len(ids)

    def words(self, result: SearchResult) -> list[list[str]]:
        """Generated words per item, up to EOS (one word per attention map)."""
        return [[self.vocab.itos[i] for i in row.tolist()[: self._caption_length(row)]] for row in result.tokens]

    def attention_grids(self, result: SearchResult) -> list[Tensor]:
        """Per item (T_i, H, W) attention of each generated word (EOS excluded)."""
        g = self.grid_size
        out = []
        for row, alpha in zip(result.tokens, result.alphas):
            n = self._caption_length(row)
            out.append(alpha[:n].reshape(n, g, g).float().cpu())
        return out

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        total, ce, reg = self.loss(self.encode(batch), batch["captions"])
        b = batch["captions"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=b)
        self.log("train/ce", ce, batch_size=b)
        self.log("train/doubly_stochastic", reg, batch_size=b)
        return total

    def _eval_step(self, batch: dict, stage: str) -> None:
        features = self.encode(batch)
        total, _, _ = self.loss(features, batch["captions"])
        self.log(f"{stage}/loss", total, batch_size=features.shape[0], sync_dist=True)
        result = self.generate(features)
        words = self.words(result)
        boxes = batch.get("boxes")  # named boxes when the data knows where things are
        grids = self.attention_grids(result) if boxes is not None else [None] * len(words)
        for i, w in enumerate(words):
            item = {"image_id": batch["image_ids"][i], "caption": " ".join(w), "references": batch["references"][i]}
            if boxes is not None:
                item.update(words=w, alpha=grids[i], boxes=boxes[i])
            self._eval_outputs.append(item)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_caption_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_caption_metrics("test")

    def _log_caption_metrics(self, stage: str) -> None:
        from captioning.localisation import pointing_game
        from captioning.metrics import caption_scores

        # Gather every rank's captions, drop the distributed sampler's padding duplicates,
        # and score the corpus once: each rank computes (and logs) the same numbers.
        items = gather_unique(self._eval_outputs, "image_id")
        self._eval_outputs = []
        if not items or self.trainer.sanity_checking:
            return
        scores = caption_scores({k: v["caption"] for k, v in items.items()},
                                {k: v["references"] for k, v in items.items()})
        boxed = [v for v in items.values() if "boxes" in v]
        if boxed:  # the pointing game (captioning/localisation.py)
            loc = pointing_game([v["words"] for v in boxed], [v["alpha"] for v in boxed], [v["boxes"] for v in boxed])
            scores.update({k: v for k, v in loc.items() if not k.endswith(("_hits", "_total"))})
        for name, value in scores.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.log(f"{stage}/{name}", float(value), rank_zero_only=False, sync_dist=False)
        self.log(f"{stage}/num_images", float(len(items)))
        self.last_eval_captions = {k: v["caption"] for k, v in items.items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Scores, data and one example image with the weights (see captioning.model_card)."""
        from captioning.model_card import run_summary

        if self._trainer is not None:
            summary = run_summary(self.trainer, with_example=True, cached_example=getattr(self, "_example", None))
            self._example = summary.get("example")
            checkpoint["captioning"] = summary

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        result = self.generate(self.encode(batch))
        return [{"image_id": i, "caption": " ".join(w)} for i, w in zip(batch["image_ids"], self.words(result))]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.decoder.parameters() if p.requires_grad], "lr": hp.lr}]
        if enc:
            groups.append({"params": enc, "lr": hp.encoder_lr})
        # fused: one kernel for all parameters (CPU and CUDA); ~3-10x faster steps than the loop.
        # Not under mixed precision: Lightning cannot clip gradients of an optimizer that
        # unscales them itself.
        precision = str(getattr(self._trainer, "precision", "32-true")) if self._trainer is not None else "32-true"
        fused = "mixed" not in precision and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused or None)
        if hp.scheduler == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = min(hp.warmup_steps, total - 1)

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / (warm + 1)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/cider"}}
        return optimizer


def compile_decoder_step(decoder: nn.Module) -> None:
    """torch.compile the decoder's per-step functions, once: ``step`` (beam/greedy search) and,
    when the decoder has them, ``_attend``/``_cell`` (the steps of the teacher-forced loop).

    Compiling per step rather than the whole forward keeps one graph for every caption
    length (the loop stays in Python); ``dynamic=True`` avoids recompiling when the beam
    batch shrinks. Only the instance's attributes change: state_dict and checkpoints do not.
    """
    if getattr(decoder, "_step_compiled", False):
        return
    for name in ("step", "_attend", "_cell"):
        fn = getattr(decoder, name, None)
        if callable(fn):
            setattr(decoder, name, torch.compile(fn, dynamic=True))
    decoder._step_compiled = True
