"""The image captioning LightningModule: what is specific to images.

The maths lives in plain modules (encoder, :class:`ShowAttendTellDecoder`, search); what both
models share (evaluation, logging, optimisation, checkpoints) is :class:`captioning.models.base.AttentionModel`.
This class computes the loss with padding masked out and scores validation/test by real
decoding (beam or greedy), never teacher forcing: COCO caption metrics, and the pointing game
when batches carry named boxes (captioning/eval/localisation.py).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from captioning.data.vocab import Vocabulary
from captioning.eval.reward import SelfCriticalReward
from captioning.models.base import AttentionModel, check_scheduler
from captioning.models.self_critical import SelfCriticalTraining
from captioning.models.train_step import pad_length
from captioning.nn.encoders import Encoder, encoder_config
from captioning.nn.image_decoder import ShowAttendTellDecoder
from captioning.nn.repeats import RepeatableNgrams
from captioning.nn.search import SearchResult

SCST_BASELINES = ("mean", "greedy")


class ImageCaptioner(SelfCriticalTraining, AttentionModel):
    """Show, Attend and Tell captioner.

    Args:
        encoder: a :class:`captioning.nn.encoders.Encoder`: images (B, 3, H, W) -> features
            (B, S, C); it states its preprocessing, which the datamodule and ``caption`` follow.
        vocab: the vocabulary as plain data ({"itos": [...]}) — linked from the datamodule
            by the CLI and stored in the checkpoint.
        attention: score function or ``"none"`` (mean-feature baseline); num_heads > 1 for
            multi-head. embed_dim, decoder_dim, attention_dim, dropout, gate: decoder sizes.
        alpha_c: weight of the doubly stochastic attention regulariser.
        lr, encoder_lr, weight_decay: AdamW; encoder_lr applies to trainable encoder parameters.
            ``encoder_lr: null`` (the default) picks it from the encoder: ``lr / 4`` for pretrained
            weights being fine-tuned, ``lr`` for an encoder trained from scratch (e.g. SmallCNN), which
            learns next to nothing at a fine-tuning rate.
        scheduler: "none", "cosine" (linear warmup then cosine decay per step) or "plateau"
            (halve the learning rate when val/cider stops improving).
        beam_size: 1 = greedy; used for validation, test and predict.
        max_length, length_penalty: decoding limits (GNMT alpha for beam search).
        no_repeat_ngram: n > 0: decoding (validation, test, predict, ``caption``, the demo) never
            emits an n-gram a caption already holds, which stops loops like "a man in a man in a",
            except the n-grams that training captions themselves repeat ("a small" in "a small red
            square and a small blue circle"), which ``fit`` collects and the weights keep
            (captioning.nn.repeats); 0 (the default) turns it off. The photo configs set 3, chosen
            on a real validation split (docs/results.md).
        self_critical: train by self-critical sequence training (Rennie et al. 2017) instead of
            cross-entropy: ``scst_samples`` captions sampled per image, rewarded by their CIDEr-D
            against the image's references (document frequencies of the training references,
            :class:`captioning.eval.cider.CiderD`), minus a baseline. Start it from a
            cross-entropy model with ``init_from``; configs/scst.yaml.
        scst_samples: captions sampled per image (>= 2 for ``scst_baseline: mean``).
        scst_baseline: ``"mean"``: an image's baseline is the mean reward of its other samples
            (no extra decoding); ``"greedy"``: the reward of its greedy caption (the paper's).
        scst_xe_weight: > 0 adds this times the cross-entropy of the batch's reference captions to
            the self-critical loss, which keeps a model trained on few images close to its
            references (0: pure SCST).
        init_from: a checkpoint (or run folder: its best) whose weights this model starts from
            when ``fit`` is not resuming; its vocabulary must be this model's. Those weights are
            validated before the first step, so they stay the best checkpoint unless training
            beats them on validation.
        label_smoothing: cross-entropy label smoothing.
        compile_decoder: torch.compile the decoder step (GPU speed option).
        allow_unk: let decoding emit ``<unk>`` (default: never; the next likeliest word is
            used), for validation, test, predict and ``caption``.
        query: ``"previous"`` (Show-Attend-Tell: attend with h_{t-1} before the LSTM step) or
            ``"current"`` (Luong: attend with h_t after it, with input feeding).
        sentinel: adaptive attention with a visual sentinel (Lu et al. 2017): per word, beta_t is
            the weight on language instead of the image (captioning.nn.image_decoder).
        cuda_graphs: on one CUDA device, run each training step as a CUDA graph replay
            (captioning.models.train_step); False runs it eagerly.
        tf32: TF32 tensor cores for float32 products on GPUs that have them (Ampere and newer).
    """

    def __init__(
        self,
        encoder: Encoder,
        vocab: dict | None = None,
        attention: str = "additive",
        num_heads: int = 1,
        embed_dim: int = 512,
        decoder_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        gate: bool = True,
        alpha_c: float = 1.0,
        lr: float = 4e-4,
        encoder_lr: float | None = None,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        warmup_steps: int = 0,
        beam_size: int = 3,
        max_length: int = 30,
        length_penalty: float = 0.0,
        no_repeat_ngram: int = 0,
        label_smoothing: float = 0.0,
        compile_decoder: bool = False,
        allow_unk: bool = False,
        query: str = "previous",
        sentinel: bool = False,
        cuda_graphs: bool = True,
        tf32: bool = True,
        self_critical: bool = False,
        scst_samples: int = 5,
        scst_baseline: str = "mean",
        scst_xe_weight: float = 0.0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if scst_baseline not in SCST_BASELINES:
            raise ValueError(f"scst_baseline must be one of {SCST_BASELINES}, got {scst_baseline!r}")
        if not scst_xe_weight >= 0:
            raise ValueError(f"scst_xe_weight must be >= 0, got {scst_xe_weight}")
        if scst_samples < 1 or (scst_baseline == "mean" and scst_samples < 2):
            raise ValueError(
                f"scst_samples must be >= 1 (>= 2 with scst_baseline: mean, whose baseline is the other "
                f"samples), got {scst_samples}"
            )
        if vocab is None:
            raise ValueError(
                "ImageCaptioner needs a vocabulary: the CLI links it from the datamodule "
                "(data.vocab); in Python pass vocab=datamodule.vocab.to_dict()"
            )
        check_scheduler("ImageCaptioner", scheduler)
        self.save_hyperparameters(ignore=["encoder"])
        self.hparams["encoder"] = encoder_config(encoder)
        self.vocab = Vocabulary.from_dict(vocab)
        self.encoder = encoder
        self.grid_size = int(encoder.grid_size)
        self.decoder = ShowAttendTellDecoder(
            len(self.vocab),
            encoder.out_channels,
            embed_dim,
            decoder_dim,
            attention_dim,
            attention=attention,
            num_heads=num_heads,
            gate=gate,
            dropout=dropout,
            max_positions=self.grid_size**2,
            query=query,
            sentinel=sentinel,
        )
        # The n-grams the training captions repeat: the repetition block lets decoding repeat them.
        self.repeatable = RepeatableNgrams()

    eval_key = "image_id"
    count_name = "num_images"
    plateau_monitor = "val/cider"
    example_in_checkpoint = True

    @property
    def preprocessing(self):
        """The encoder's :class:`captioning.data.images.Preprocessing` (input size, mean/std)."""
        return self.encoder.preprocessing

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.compile_decoder:
            compile_decoder_step(self.decoder)
        init_from = self.hparams.get("init_from")
        if stage == "fit" and init_from and self._trainer is not None:
            # Loaded before Lightning restores a resumed run, whose checkpoint then replaces these weights.
            self._initial_weights = self.load_initial_weights(init_from)
        if stage == "fit" and self.hparams.get("self_critical") and self._trainer is not None:
            self._reward = SelfCriticalReward.for_model(self, getattr(self.trainer, "datamodule", None))

    # ------------------------------------------------------------------ core
    def encode(self, batch: dict) -> Tensor:
        """Batch -> features (B, S, C); uses cached features when the batch carries them.
        ``batch["images"]``: (B, 3, H, W) uint8 at the encoder's input size (it normalises)."""
        if "features" in batch:
            dtype = (
                self.dtype if isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point else torch.float32
            )
            return batch["features"].to(dtype)
        return self.encoder(batch["images"])

    def loss(self, features: Tensor, captions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced loss. captions (B, L) = BOS w.. EOS PAD.. -> (total, cross-entropy, regulariser).

        Padding costs nothing: the decoder skips each caption's padding steps and the output layer
        runs on the real words only (:meth:`token_loss`; on GPUs padding is masked instead, with
        no host sync)."""
        inputs, targets = captions[:, :-1], captions[:, 1:]
        real = targets != self.vocab.pad_id  # (B, T)
        out, alphas, _ = self.decoder.teacher_forced(features, inputs, steps=real.sum(1))
        ce = self.token_loss(self.decoder, out, targets, real)
        if self.decoder.attention is None or self.hparams.alpha_c == 0:
            reg = ce.new_zeros(())
        else:
            # Doubly stochastic attention: every cell should receive ~1 unit of attention
            # over the caption (padding steps excluded).
            valid = real.unsqueeze(-1).to(alphas.dtype)  # (B, T, 1)
            reg = self.hparams.alpha_c * ((1.0 - (alphas * valid).sum(1)) ** 2).mean()
        return ce + reg, ce, reg

    @property
    def target_vocab(self) -> Vocabulary:
        return self.vocab

    @torch.no_grad()
    def generate(
        self,
        features: Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        allow_unk: bool | None = None,
    ) -> SearchResult:
        """Decode captions for features (B, S, C); beam_size 1 = greedy; ``<unk>`` per :meth:`banned_ids`."""
        return self.search(
            self.decoder,
            self.decoder.prepare_memory(features),
            features.shape[0],
            beam_size,
            max_length,
            allow_unk=allow_unk,
        )

    def _caption_length(self, row: Tensor) -> int:
        """Number of generated words before EOS (special tokens mid-caption included, so
        words and attention maps stay aligned)."""
        ids = row.tolist()
        return ids.index(self.vocab.eos_id) if self.vocab.eos_id in ids else len(ids)

    def words(self, result: SearchResult) -> list[list[str]]:
        """Generated words per item, up to EOS (one word per attention map)."""
        return [[self.vocab.itos[i] for i in row.tolist()[: self._caption_length(row)]] for row in result.tokens]

    def sentinel_weights(self, result: SearchResult) -> list[list[float]] | None:
        """Per item, the sentinel weight beta of each generated word (EOS excluded), or None
        for a model without a sentinel."""
        if result.betas is None:
            return None
        return [b[: self._caption_length(row)].float().cpu().tolist() for row, b in zip(result.tokens, result.betas)]

    def attention_grids(self, result: SearchResult) -> list[Tensor]:
        """Per item (T_i, H, W) attention of each generated word (EOS excluded)."""
        g = self.grid_size
        out = []
        for row, alpha in zip(result.tokens, result.alphas):
            n = self._caption_length(row)
            out.append(alpha[:n].reshape(n, g, g).float().cpu())
        return out

    # ------------------------------------------------------------------ training
    def train_inputs(self, batch: dict) -> dict[str, Tensor]:
        """Features (or images) and captions; captions padded to a length bucket under CUDA graphs.
        Self-critical training adds ``image_index`` (B,): each image's row in the reward's references."""
        captions = batch["captions"]
        if self.graphed:
            captions = pad_length(captions, self.length_bucket, self.vocab.pad_id)
        key = "features" if "features" in batch else "images"
        inputs = {key: batch[key], "captions": captions}
        if self._reward is not None:
            inputs["image_index"] = self._reward.rows(batch["image_ids"])
        return inputs

    def train_losses(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._reward is not None:
            return self.self_critical_losses(self.encode(inputs), inputs["image_index"], inputs["captions"])
        total, ce, reg = self.loss(self.encode(inputs), inputs["captions"])
        return {"loss": total, "ce": ce, "doubly_stochastic": reg}

    def can_run_step_graphs(self) -> str | None:
        if self.hparams.get("compile_decoder", False):
            return "compile_decoder is on"
        return self.self_critical_graph_problem()

    def eval_items(self, batch: dict, stage: str) -> list[dict]:
        features = self.encode(batch)
        total, _, _ = self.loss(features, batch["captions"])
        self.log(f"{stage}/loss", total, batch_size=features.shape[0], sync_dist=True)
        result = self.generate(features)
        words = self.words(result)
        boxes = batch.get("boxes")  # named boxes when the data knows where things are
        grids = self.attention_grids(result) if boxes is not None else [None] * len(words)
        items = []
        for i, w in enumerate(words):
            item = {"image_id": batch["image_ids"][i], "prediction": " ".join(w), "references": batch["references"][i]}
            if boxes is not None:
                item.update(words=w, alpha=grids[i], boxes=boxes[i])
            items.append(item)
        return items

    def eval_scores(self, items: list[dict]) -> dict[str, float]:
        from captioning.eval.localisation import pointing_game
        from captioning.eval.metrics import caption_scores

        scores = caption_scores(
            {v["image_id"]: v["prediction"] for v in items}, {v["image_id"]: v["references"] for v in items}
        )
        boxed = [v for v in items if "boxes" in v]
        # The pointing game (captioning/eval/localisation.py). Not for the no-attention baseline:
        # its "map" is a uniform mean, whose peak is an arbitrary cell (a score below chance that
        # means nothing); its tables show n/a instead.
        if boxed and self.hparams.attention != "none":
            loc = pointing_game([v["words"] for v in boxed], [v["alpha"] for v in boxed], [v["boxes"] for v in boxed])
            scores.update({k: v for k, v in loc.items() if not k.endswith(("_hits", "_total"))})
        return scores

    @torch.no_grad()
    def attention_figures(
        self, batch: dict, max_items: int, panel_size: int = 128, beam_size: int | None = None
    ) -> list[dict]:
        """The image, then one attention panel per generated word, for the first images of
        ``batch``; [] for batches of cached features (no images to draw on)."""
        from PIL import Image

        from captioning.viz import attention_overlay

        if "images" not in batch:
            return []
        n = min(max_items, len(batch["image_ids"]))
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        result = self.generate(self.encode(sub), beam_size=beam_size)
        images = cast(Tensor, sub["images"])
        pixels = images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()  # (n, H, W, 3)
        betas = self.sentinel_weights(result)
        items = []
        for i, (words, grid) in enumerate(zip(self.words(result), self.attention_grids(result))):
            key = str(sub["image_ids"][i])
            items.append(
                {
                    "key": key,
                    "prediction": " ".join(words),
                    "references": list(sub["references"][i]),
                    "input": Image.fromarray(pixels[i]),
                    "sentinel": betas[i] if betas is not None else None,
                    "figure": attention_overlay(
                        pixels[i],
                        words,
                        grid,
                        title=f"image {key}",
                        panel_size=panel_size,
                        sentinel=betas[i] if betas is not None else None,
                    ),
                }
            )
        return items

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        result = self.generate(self.encode(batch))
        return [{"image_id": i, "caption": " ".join(w)} for i, w in zip(batch["image_ids"], self.words(result))]

    # ------------------------------------------------------------------ optimisation
    @property
    def encoder_learning_rate(self) -> float:
        """``encoder_lr``, or when None: ``lr / 4`` for a pretrained encoder, ``lr`` for one trained from scratch."""
        hp = self.hparams
        if hp.get("encoder_lr") is not None:
            return float(hp.encoder_lr)
        return float(hp.lr) / 4 if getattr(self.encoder, "starts_pretrained", False) else float(hp.lr)

    def param_groups(self) -> list[dict]:
        """The decoder at ``lr``; trainable encoder parameters at :attr:`encoder_learning_rate`."""
        hp = self.hparams
        return [
            {"params": [p for p in self.decoder.parameters() if p.requires_grad], "lr": hp.lr},
            {"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": self.encoder_learning_rate},
        ]


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
    setattr(decoder, "_step_compiled", True)  # noqa: B010 - a plain flag, not a submodule
