"""The text seq2seq LightningModule: loss, optimisation, decoding for metrics, logging.

The maths lives in :mod:`captioning.seq2seq` (BiLSTM encoder, attention LSTM decoder built on
the shared attention layer) and :mod:`captioning.search` (the same greedy/beam search as
the image captioner). This class computes the loss with padding masked out and scores
validation/test by real decoding: ``val/bleu``, ``val/chrf`` (sacrebleu; the BLEU signature
is printed and logged once), ``val/exact_match`` and, when the datamodule gives true
alignments (synthetic tasks), ``val/alignment``: how often the attention peak of a reference
target token falls on its true source position. Alignment is read from the teacher-forced
pass over the reference (the attention used to emit reference token t after the correct
prefix), so it is defined even where the decoded output differs from the reference.

Text batch (dict), produced by every datamodule of ``datamodules/text.py``:
    "source" (B, S) ids ``tokens + [eos]`` padded with 0; "source_lengths" (B,);
    "target" (B, T) ``[bos] tokens [eos]`` padded; "target_lengths" (B,); "ids" list;
    "source_text" list[str]; "references" list[str] (detokenised targets);
    optional "alignments": per item, per target token and the EOS, its source index or -1.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from captioning.distributed import gather_unique
from captioning.search import SearchResult, beam_search, greedy_search
from captioning.seq2seq import AttentionLSTMDecoder, BiLSTMEncoder
from captioning.text_vocab import TextVocab
from captioning.vocab import EOS


class Translation(NamedTuple):
    """One decoded sentence: ``text`` (detokenised), ``source_tokens`` (S labels incl. ``<eos>``),
    ``target_tokens`` (T generated tokens, ``<eos>`` last when produced), ``alpha`` (T, S), ``score``."""

    text: str
    source_tokens: list[str]
    target_tokens: list[str]
    alpha: Tensor
    score: float


class Seq2SeqModel(pl.LightningModule):
    """BiLSTM encoder + attention LSTM decoder (Bahdanau / Luong), trained with teacher forcing.

    Args:
        vocab: ``{"source", "target", "tokenizer"}`` plain data (see captioning.text_vocab),
            linked from the datamodule's ``vocab_data`` by the CLI and stored in the checkpoint.
        attention: score function (dot | scaled_dot | general | additive | content | location)
            or ``"none"`` (fixed context vector baseline). num_heads > 1: multi-head.
        query: ``"bahdanau"`` (previous decoder state asks) or ``"luong"`` (current state asks,
            input feeding).
        embed_dim: word embedding size (source and target); encoder_dim: BiLSTM hidden size per
            direction (states are 2x wide); encoder_layers; decoder_dim; attention_dim.
        dropout: embeddings, between encoder layers, before the output layer.
        lr, weight_decay: AdamW. scheduler: "none" or "cosine" (per step, linear warmup).
        beam_size: 1 = greedy; used for validation, test, predict and translate.
        max_length, max_length_ratio: decode at most ``min(max_length, ratio * S + 10)`` words.
        length_penalty: GNMT alpha for beam search. label_smoothing: cross-entropy smoothing.
        max_source_length: longest source (tokens incl. EOS) the ``location`` score handles.
    """

    def __init__(self, vocab: dict | None = None, attention: str = "additive", query: str = "bahdanau",
                 num_heads: int = 1, embed_dim: int = 128, encoder_dim: int = 128, encoder_layers: int = 1,
                 decoder_dim: int = 256, attention_dim: int = 128, dropout: float = 0.2, lr: float = 2e-3,
                 weight_decay: float = 0.01, scheduler: str = "none", warmup_steps: int = 0, beam_size: int = 1,
                 max_length: int = 200, max_length_ratio: float = 2.0, length_penalty: float = 0.0,
                 label_smoothing: float = 0.0, max_source_length: int = 256) -> None:
        super().__init__()
        if vocab is None:
            raise ValueError("Seq2SeqModel needs vocabularies: the CLI links them from the datamodule "
                             "(data.vocab_data); in Python pass vocab=datamodule.vocab_data")
        if scheduler not in ("none", "cosine"):
            raise ValueError(f"scheduler must be 'none' or 'cosine', got {scheduler!r}")
        self.save_hyperparameters()
        self.text_vocab = TextVocab.from_dict(vocab)
        src, tgt = self.text_vocab.source, self.text_vocab.target
        self.encoder = BiLSTMEncoder(len(src), embed_dim, encoder_dim, encoder_layers, dropout, src.pad_id)
        self.decoder = AttentionLSTMDecoder(
            len(tgt), self.encoder.out_dim, embed_dim, decoder_dim, attention_dim, attention=attention,
            query=query, num_heads=num_heads, dropout=dropout, max_positions=max_source_length)
        self._eval_outputs: list[dict] = []
        self.bleu_signature: str | None = None

    # ------------------------------------------------------------------ core
    def memory(self, source: Tensor, lengths: Tensor) -> dict:
        """source (B, S), lengths (B,) -> the decoder memory (encoder states, keys projected once)."""
        enc = self.encoder(source, lengths)
        return self.decoder.prepare_memory(enc.states, enc.mask, enc.summary)

    def loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Teacher-forced cross-entropy over real target tokens -> (loss, alphas (B, T-1, S))."""
        enc = self.encoder(batch["source"], batch["source_lengths"])
        target = batch["target"]
        out = self.decoder(enc.states, target[:, :-1], enc.mask, enc.summary)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), target[:, 1:].reshape(-1),
                             ignore_index=self.text_vocab.target.pad_id,
                             label_smoothing=self.hparams.label_smoothing)
        return ce, out.alphas

    @torch.no_grad()
    def generate(self, source: Tensor, lengths: Tensor, beam_size: int | None = None,
                 max_length: int | None = None) -> SearchResult:
        """Decode source (B, S) with the shared greedy (beam_size 1) or beam search."""
        hp = self.hparams
        beam = hp.beam_size if beam_size is None else beam_size
        length = max_length or min(hp.max_length, int(hp.max_length_ratio * source.shape[1]) + 10)
        memory = self.memory(source, lengths)
        tgt = self.text_vocab.target
        common = dict(bos_id=tgt.bos_id, eos_id=tgt.eos_id, pad_id=tgt.pad_id, max_length=length)
        if beam <= 1:
            return greedy_search(self.decoder, memory, source.shape[0], **common)
        return beam_search(self.decoder, memory, source.shape[0], beam_size=beam,
                           length_penalty=hp.length_penalty, **common)

    def hypothesis_tokens(self, result: SearchResult) -> list[list[str]]:
        return [self.text_vocab.target.decode(row.tolist()) for row in result.tokens]

    def detokenize(self, tokens: Sequence[str]) -> str:
        return self.text_vocab.tokenizer.detokenize(tokens)

    def _translations(self, source: Tensor, lengths: Tensor, result: SearchResult) -> list[Translation]:
        out, tgt = [], self.text_vocab.target
        for i, words in enumerate(self.hypothesis_tokens(result)):
            s = int(lengths[i])
            n = min(int(result.lengths[i]), result.tokens.shape[1])  # tokens up to and incl. EOS
            # One heatmap row per generated position (an odd <pad>/<bos> from an untrained model
            # included), so rows and attention never drift apart.
            rows = [EOS if t == tgt.eos_id else tgt.itos[t] for t in result.tokens[i, :n].tolist()]
            out.append(Translation(self.detokenize(words), self.text_vocab.source_labels(source[i, :s].tolist()),
                                   rows, result.alphas[i, :n, :s].float().cpu(), float(result.scores[i])))
        return out

    def encode_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenise and encode source sentences -> source (B, S) on the model's device, lengths (B,)."""
        ids = []
        for i, text in enumerate(texts):
            tokens = self.text_vocab.tokenizer(text)
            if not tokens:
                raise ValueError(f"input {i + 1} is empty: nothing to translate")
            if self.decoder.attention_name == "location" and len(tokens) + 1 > self.hparams.max_source_length:
                raise ValueError(f"input {i + 1} has {len(tokens)} tokens; this model's 'location' attention "
                                 f"handles at most {self.hparams.max_source_length - 1}")
            ids.append(torch.tensor(self.text_vocab.encode_source(tokens), dtype=torch.long))
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long, device=self.device)
        return pad_sequence(ids, batch_first=True).to(self.device), lengths

    @torch.no_grad()
    def translate(self, texts: Sequence[str], beam_size: int | None = None,
                  max_length: int | None = None) -> list[Translation]:
        """Translate raw sentences in one batch; tokenised as in training (tokenizer in the vocab)."""
        source, lengths = self.encode_texts(texts)
        return self._translations(source, lengths, self.generate(source, lengths, beam_size, max_length))

    @torch.no_grad()
    def attention_figures(self, batch: dict, max_items: int = 4) -> list[dict]:
        """Heatmaps (source x generated) of the first ``max_items`` items of a text batch.

        Returns per item ``{"key", "figure" (PIL), "prediction", "references" [str], "input"}``.
        """
        from captioning.viz import seq2seq_heatmap

        n = min(max_items, batch["source"].shape[0])
        source = batch["source"][:n].to(self.device)
        lengths = batch["source_lengths"][:n].to(self.device)
        figures = []
        for i, tr in enumerate(self._translations(source, lengths, self.generate(source, lengths))):
            figures.append({"key": batch["ids"][i], "prediction": tr.text, "references": [batch["references"][i]],
                            "input": batch["source_text"][i],
                            "figure": seq2seq_heatmap(tr.source_tokens, tr.target_tokens, tr.alpha)})
        return figures

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ce, _ = self.loss(batch)
        self.log("train/loss", ce, prog_bar=True, batch_size=batch["source"].shape[0])
        return ce

    def _eval_step(self, batch: dict, stage: str) -> None:
        ce, alphas = self.loss(batch)
        b = batch["source"].shape[0]
        self.log(f"{stage}/loss", ce, batch_size=b, sync_dist=True)
        result = self.generate(batch["source"], batch["source_lengths"])
        hyps = [self.detokenize(t) for t in self.hypothesis_tokens(result)]
        alignments = batch.get("alignments") if self.decoder.attention is not None else None
        for i in range(b):
            item = {"id": batch["ids"][i], "hypothesis": hyps[i], "reference": batch["references"][i]}
            if alignments is not None:
                n, s = int(batch["target_lengths"][i]) - 1, int(batch["source_lengths"][i])
                item.update(alpha=alphas[i, :n, :s].float().cpu(), alignment=list(alignments[i]))
            self._eval_outputs.append(item)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_text_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_text_metrics("test")

    def _log_text_metrics(self, stage: str) -> None:
        from captioning.metrics import alignment_score, text_scores

        # Every rank gathers every sentence (corpus BLEU is not a mean of batch scores); the
        # distributed sampler's padding duplicates share an id and collapse here.
        items = gather_unique(self._eval_outputs, "id")
        self._eval_outputs = []
        if not items or self.trainer.sanity_checking:
            return
        values = list(items.values())
        scores = text_scores([v["hypothesis"] for v in values], [v["reference"] for v in values])
        self._log_signature(str(scores.pop("bleu_signature")))
        with_alignment = [v for v in values if "alpha" in v]
        if with_alignment:
            scores["alignment"] = alignment_score([v["alpha"] for v in with_alignment],
                                                  [v["alignment"] for v in with_alignment])
        for name, value in scores.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.log(f"{stage}/{name}", float(value), rank_zero_only=False, sync_dist=False)
        self.log(f"{stage}/num_sentences", float(len(items)))
        self.last_eval_translations = {k: v["hypothesis"] for k, v in items.items()}

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
        return [{"id": i, "source": s, "translation": self.detokenize(t)}
                for i, s, t in zip(batch["ids"], batch["source_text"], self.hypothesis_tokens(result))]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(hp.warmup_steps, total - 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
