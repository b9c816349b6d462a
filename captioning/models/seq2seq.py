"""The text seq2seq LightningModule: what is specific to text.

What both models share (evaluation, logging, optimisation, checkpoints) is
:class:`captioning.models.base.AttentionModel`.

The maths lives in :mod:`captioning.nn.text_encoder` (BiLSTM encoder) and
:mod:`captioning.nn.text_decoder` (attention LSTM decoder built on the shared attention layer)
and :mod:`captioning.nn.search` (the same greedy/beam search as the image captioner). This
class computes the loss with padding masked out and scores validation/test by real decoding:
``val/bleu``, ``val/chrf`` (sacrebleu; the BLEU signature is printed and logged once),
``val/exact_match`` and, when the datamodule gives true alignments (synthetic tasks),
``val/alignment``: how often the attention peak of a reference target token falls on its true
source position. Alignment is read from the teacher-forced pass over the reference (the
attention used to emit reference token t after the correct prefix), so it is defined even where
the decoded output differs from the reference. With a sentinel (``sentinel: true``) it reads
the source weights renormalised over the real source positions, as the image decoder documents;
the sentinel weight beta of each generated token travels in :class:`Translation`
(``sentinel``), the ``translate`` JSON and the heatmaps.

Scores (:func:`captioning.models.translations.score_translations`) and the result types
(:class:`Translation`, :class:`SourceReport`): :mod:`captioning.models.translations`.

Decoding never emits ``<pad>``/``<bos>``, nor ``<unk>`` unless ``allow_unk`` (their probability
is set to 0 and the rest renormalised). Each sentence's output is capped at
``min(max_length, max_length_ratio * its source length + 10)`` tokens, so a translation does
not depend on which other sentences share its batch. Sources longer than
``max_source_length`` tokens (EOS included) are cut to their first tokens (``translate`` warns).

Text batch (dict), produced by every datamodule of ``captioning/data/text.py``:
    "source" (B, S) ids ``tokens + [eos]`` padded with 0; "source_lengths" (B,);
    "target" (B, T) ``[bos] tokens [eos]`` padded; "target_lengths" (B,); "ids" list;
    "source_text" list[str]; "references" list[str] (detokenised targets);
    optional "alignments": per item, per target token and the EOS, its source index or -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from captioning.data.text_vocab import TextVocab
from captioning.data.vocab import EOS, Vocabulary
from captioning.models.base import AttentionModel, check_scheduler
from captioning.models.train_step import pad_length
from captioning.models.translations import SourceReport, Translation, score_translations
from captioning.nn.decoder_state import DecoderMemory
from captioning.nn.search import SearchResult
from captioning.nn.text_decoder import AttentionLSTMDecoder
from captioning.nn.text_encoder import BiLSTMEncoder


class Seq2SeqModel(AttentionModel):
    """BiLSTM encoder + attention LSTM decoder (Bahdanau / Luong), trained with teacher forcing.

    Args:
        vocab: ``{"source", "target", "tokenizer"}`` plain data (see captioning.data.text_vocab),
            linked from the datamodule's ``vocab_data`` by the CLI and stored in the checkpoint.
        attention: score function (dot | scaled_dot | general | additive | content | location)
            or ``"none"`` (fixed context vector baseline). num_heads > 1: multi-head.
        query: ``"bahdanau"`` (previous decoder state asks) or ``"luong"`` (current state asks,
            input feeding).
        embed_dim: word embedding size (source and target); encoder_dim: BiLSTM hidden size per
            direction (states are 2x wide); encoder_layers; decoder_dim; attention_dim.
        dropout: embeddings, between encoder layers, before the output layer.
        lr, weight_decay: AdamW. scheduler: "none", "cosine" (per step, linear warmup) or
            "plateau" (halve the learning rate when val/bleu stops improving).
        beam_size: 1 = greedy; used for validation, test, predict and translate.
        val_beam_size: beam for the validation passes during ``fit`` (None = beam_size); 1 keeps
            validation cheap on small data while test and translate use the beam.
        max_length, max_length_ratio: decode at most ``min(max_length, ratio * S + 10)`` tokens
            per sentence (S: its own source length).
        length_penalty: GNMT alpha for beam search. label_smoothing: cross-entropy smoothing.
        no_repeat_ngram: n > 0: decoding never repeats an n-gram within a sentence (0: off; off by
            default for text: a translation may repeat words its source repeats).
        max_source_length: longest source the model reads (tokens incl. EOS); longer ones are
            cut to their first tokens (also the positions the ``location`` score has).
        allow_unk: let decoding emit ``<unk>`` (default: never; see the module docstring).
        fused: teacher forcing through the fused recurrence where it applies (captioning.nn.text_decoder).
        sentinel: adaptive attention with a language sentinel (captioning.nn.text_decoder): each target
            token may rely on the decoder's own state instead of the source; its weight beta is
            reported per token. Needs an attention score. Off: the model is exactly as without it.
        cuda_graphs: on one CUDA device, run each training step as a CUDA graph replay
            (captioning.models.train_step); False runs it eagerly.
        tf32: TF32 tensor cores for float32 products on GPUs that have them (Ampere and newer).
    """

    def __init__(
        self,
        vocab: dict | None = None,
        attention: str = "additive",
        query: str = "bahdanau",
        num_heads: int = 1,
        embed_dim: int = 128,
        encoder_dim: int = 128,
        encoder_layers: int = 1,
        decoder_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.2,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        scheduler: str = "none",
        warmup_steps: int = 0,
        beam_size: int = 1,
        max_length: int = 200,
        max_length_ratio: float = 2.0,
        length_penalty: float = 0.0,
        no_repeat_ngram: int = 0,
        label_smoothing: float = 0.0,
        max_source_length: int = 256,
        val_beam_size: int | None = None,
        allow_unk: bool = False,
        fused: bool = True,
        sentinel: bool = False,
        cuda_graphs: bool = True,
        tf32: bool = True,
    ) -> None:
        super().__init__()
        if max_source_length < 2:
            raise ValueError(
                f"max_source_length must be >= 2 (a token and the end of sentence), got {max_source_length}"
            )
        if vocab is None:
            raise ValueError(
                "Seq2SeqModel needs vocabularies: the CLI links them from the datamodule "
                "(data.vocab_data); in Python pass vocab=datamodule.vocab_data"
            )
        check_scheduler("Seq2SeqModel", scheduler)
        self.save_hyperparameters()
        self.text_vocab = TextVocab.from_dict(vocab)
        src, tgt = self.text_vocab.source, self.text_vocab.target
        self.encoder = BiLSTMEncoder(len(src), embed_dim, encoder_dim, encoder_layers, dropout, src.pad_id)
        self.decoder = AttentionLSTMDecoder(
            len(tgt),
            self.encoder.out_dim,
            embed_dim,
            decoder_dim,
            attention_dim,
            attention=attention,
            query=query,
            num_heads=num_heads,
            dropout=dropout,
            max_positions=max_source_length,
            fused=fused,
            sentinel=sentinel,
        )
        self.bleu_signature: str | None = None

    eval_key = "id"
    count_name = "num_sentences"
    plateau_monitor = "val/bleu"

    # ------------------------------------------------------------------ core
    def clip_source(self, source: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Cut sources past ``max_source_length`` (tokens incl. EOS) to their first tokens + EOS."""
        limit = self.hparams.max_source_length
        if source.shape[1] <= limit:
            return source, lengths
        source = source[:, :limit].clone()
        cut = torch.where(lengths > limit, self.text_vocab.source.eos_id, source[:, limit - 1])  # no host sync
        source[:, limit - 1] = cut
        return source, lengths.clamp(max=limit)

    def encode(self, source: Tensor, lengths: Tensor):
        """The encoder's states of (clipped) sources; on padded rows where the decoder masks padding
        (GPUs: no host sync), on packed ones otherwise (the same states)."""
        return self.encoder(source, lengths, padded=self.decoder.padding_mode(source.device) == "mask")

    def memory(self, source: Tensor, lengths: Tensor) -> DecoderMemory:
        """source (B, S), lengths (B,) -> the decoder memory (encoder states, keys projected once)."""
        source, lengths = self.clip_source(source, lengths)
        enc = self.encode(source, lengths)
        return self.decoder.prepare_memory(enc.states, enc.mask, enc.summary)

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Teacher-forced cross-entropy over real target tokens -> (loss, alphas (B, T-1, S)).

        The output layer (the largest product of a step) runs on the real target tokens only,
        not on padding."""
        source, lengths = self.clip_source(batch["source"], batch["source_lengths"])
        enc = self.encode(source, lengths)
        target = batch["target"]
        gold = target[:, 1:]
        real = gold != self.text_vocab.target.pad_id  # (B, T-1)
        attentional, alphas, _ = self.decoder.teacher_forced(
            enc.states, target[:, :-1], enc.mask, enc.summary, steps=real.sum(1)
        )  # padding steps are skipped
        ce = self.token_loss(self.decoder, attentional, gold, real)
        return ce, alphas

    @property
    def target_vocab(self) -> Vocabulary:
        return self.text_vocab.target

    @torch.no_grad()
    def generate(
        self,
        source: Tensor,
        lengths: Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        allow_unk: bool | None = None,
    ) -> SearchResult:
        """Decode source (B, S) with the shared greedy (beam_size 1) or beam search.

        Without ``max_length`` each sentence gets its own cap (module docstring); with it, every
        sentence may run ``max_length`` tokens. ``allow_unk`` None: the model's setting.
        """
        hp = self.hparams
        source, lengths = self.clip_source(source, lengths)
        memory = self.memory(source, lengths)
        limits = None
        if max_length is None:
            limits = (hp.max_length_ratio * lengths.float()).long().add(10).clamp(max=hp.max_length)
            max_length = int(limits.max())
        return self.search(self.decoder, memory, source.shape[0], beam_size, max_length, limits, allow_unk)

    def hypothesis_tokens(self, result: SearchResult) -> list[list[str]]:
        return [self.text_vocab.target.decode(row.tolist()) for row in result.tokens]

    def detokenize(self, tokens: Sequence[str]) -> str:
        return self.text_vocab.tokenizer.detokenize(tokens)

    def _translations(self, source: Tensor, lengths: Tensor, result: SearchResult) -> list[Translation]:
        out, tgt = [], self.text_vocab.target
        source, lengths = self.clip_source(source, lengths)
        for i, words in enumerate(self.hypothesis_tokens(result)):
            s = int(lengths[i])
            n = min(int(result.lengths[i]), result.tokens.shape[1])  # tokens up to and incl. EOS
            # One heatmap row per generated position, so rows and attention never drift apart.
            rows = [EOS if t == tgt.eos_id else tgt.itos[t] for t in result.tokens[i, :n].tolist()]
            betas = None if result.betas is None else result.betas[i, :n].float().cpu().tolist()
            out.append(
                Translation(
                    self.detokenize(words),
                    self.text_vocab.source_labels(source[i, :s].tolist()),
                    rows,
                    result.alphas[i, :n, :s].float().cpu(),
                    float(result.scores[i]),
                    betas,
                )
            )
        return out

    def source_report(self, text: str) -> SourceReport:
        """How ``text`` reaches the model (tokens, cut, unknown words): see :class:`SourceReport`."""
        v = self.text_vocab
        tokens = v.tokenizer(text)
        unknown, units = v.unknown_share(text)
        unit = "characters" if v.tokenizer.kind == "char" else "words"
        return SourceReport(
            tokens,
            min(len(tokens), self.hparams.max_source_length - 1),
            unknown,
            units,
            unit,
            v.longest_source,
            tuple(v.unseen_letters(text)),
        )

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenise and encode source sentences -> source (B, S) on the model's device, lengths (B,).

        Sources past ``max_source_length`` are cut (see :meth:`source_report`); an empty one is
        a ValueError naming it."""
        ids = []
        keep = self.hparams.max_source_length - 1
        for i, text in enumerate(texts):
            tokens = self.text_vocab.tokenizer(text)
            if not tokens:
                raise ValueError(f"input {i + 1} is empty: nothing to translate")
            ids.append(torch.tensor(self.text_vocab.encode_source(tokens[:keep]), dtype=torch.long))
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long, device=self.device)
        return pad_sequence(ids, batch_first=True).to(self.device), lengths

    @torch.no_grad()
    def translate(
        self,
        texts: Sequence[str],
        beam_size: int | None = None,
        max_length: int | None = None,
        allow_unk: bool | None = None,
    ) -> list[Translation]:
        """Translate raw sentences in one batch; tokenised as in training (tokenizer in the vocab)."""
        source, lengths = self.encode_texts(texts)
        return self._translations(source, lengths, self.generate(source, lengths, beam_size, max_length, allow_unk))

    @torch.no_grad()
    def attention_figures(
        self, batch: dict, max_items: int = 4, panel_size: int = 128, beam_size: int | None = None
    ) -> list[dict]:
        """Heatmaps (source x generated) of the first ``max_items`` items of a text batch.

        Returns per item ``{"key", "figure" (PIL), "prediction", "references" [str], "input"}``.
        """
        from captioning.viz import seq2seq_heatmap

        n = min(max_items, batch["source"].shape[0])
        source = batch["source"][:n].to(self.device)
        lengths = batch["source_lengths"][:n].to(self.device)
        figures = []
        result = self.generate(source, lengths, beam_size=beam_size)
        for i, tr in enumerate(self._translations(source, lengths, result)):
            figures.append(
                {
                    "key": batch["ids"][i],
                    "prediction": tr.text,
                    "references": [batch["references"][i]],
                    "input": batch["source_text"][i],
                    "figure": seq2seq_heatmap(tr.source_tokens, tr.target_tokens, tr.alpha, sentinel=tr.sentinel),
                }
            )
        return figures

    # ------------------------------------------------------------------ training
    def train_inputs(self, batch: dict) -> dict[str, Tensor]:
        """Sources, their lengths and targets; padded to a length bucket under CUDA graphs."""
        source, target = batch["source"], batch["target"]
        if self.graphed:
            source = pad_length(source, self.length_bucket, self.text_vocab.source.pad_id)
            target = pad_length(target, self.length_bucket, self.text_vocab.target.pad_id)
        return {"source": source, "source_lengths": batch["source_lengths"], "target": target}

    def train_losses(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"loss": self.loss(inputs)[0]}

    def eval_items(self, batch: dict, stage: str) -> list[dict]:
        ce, alphas = self.loss(batch)
        b = batch["source"].shape[0]
        self.log(f"{stage}/loss", ce, batch_size=b, sync_dist=True)
        beam = None
        if stage == "val" and self.hparams.get("val_beam_size") is not None and self.fitting:
            beam = self.hparams.val_beam_size
        result = self.generate(batch["source"], batch["source_lengths"], beam_size=beam)
        hyps = [self.detokenize(t) for t in self.hypothesis_tokens(result)]
        alignments = batch.get("alignments") if self.decoder.attention is not None else None
        lengths = batch["source_lengths"].clamp(max=self.hparams.max_source_length)
        items = []
        for i in range(b):
            item = {"id": batch["ids"][i], "prediction": hyps[i], "reference": batch["references"][i]}
            if alignments is not None:
                n, s = int(batch["target_lengths"][i]) - 1, int(lengths[i])
                item.update(
                    alpha=alphas[i, :n, :s].float().cpu(), alignment=[a if a < s else -1 for a in alignments[i]]
                )  # cut sources: not scored
            items.append(item)
        return items

    def eval_scores(self, items: list[dict]) -> dict[str, float]:
        from captioning.eval.metrics import alignment_score

        scores: dict[str, Any] = dict(
            score_translations(
                [v["prediction"] for v in items], [v["reference"] for v in items], self.text_vocab.tokenizer
            )
        )
        self._log_signature(str(scores.pop("bleu_signature")))
        with_alignment = [v for v in items if "alpha" in v]
        if with_alignment:
            scores["alignment"] = alignment_score(
                [v["alpha"] for v in with_alignment], [v["alignment"] for v in with_alignment]
            )
        return scores

    def _log_signature(self, signature: str) -> None:
        """Print and log sacrebleu's signature once, so the BLEU numbers can be reproduced."""
        if self.bleu_signature == signature:
            return
        self.bleu_signature = signature
        rank_zero_info(f"sacrebleu BLEU signature: {signature}")
        for logger in self.loggers:
            logger.log_hyperparams({"bleu_signature": signature})

    # ------------------------------------------------------------------ predict
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        result = self.generate(batch["source"], batch["source_lengths"])
        return [
            {"id": i, "source": s, "translation": self.detokenize(t)}
            for i, s, t in zip(batch["ids"], batch["source_text"], self.hypothesis_tokens(result))
        ]
