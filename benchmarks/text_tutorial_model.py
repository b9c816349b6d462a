"""The PyTorch tutorial's French->English model as a plain PyTorch loop: the baseline to beat.

Written from the description of "NLP From Scratch: Translation with a Sequence to Sequence
Network and Attention" (PyTorch tutorials), not copied: a GRU encoder and a GRU decoder with
Bahdanau (additive) attention, hidden size 128 everywhere, dropout 0.1 on the embeddings,
teacher forcing, batch 32, Adam (lr 0.001, one optimiser per network), NLL loss over all
``MAX_LENGTH`` positions of zero-padded arrays (the tutorial pads with 0, its SOS token, and
does not mask the padding), greedy decoding for ``MAX_LENGTH`` steps.

Its text handling: ``normalize`` (ASCII, lowercase, a space before ``.!?``, every other
non-letter dropped) and the filter (both sides under 10 words, English starting with
"i am", "he is", "you are", ... after normalisation). One deviation: unknown words (test
words never seen in training) map to an UNK id; the tutorial builds its vocabulary from all
pairs, test included, which a fair comparison cannot do.

Used by benchmarks/text_speed.py (throughput next to ours) and benchmarks/text_corpus.py
(the quality comparison on the Tatoeba file).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch
from torch import Tensor, nn

SOS, EOS, UNK = 0, 1, 2
MAX_LENGTH = 10
ENG_PREFIXES = (
    "i am ",
    "i m ",
    "he is",
    "he s ",
    "she is",
    "she s ",
    "you are",
    "you re ",
    "we are",
    "we re ",
    "they are",
    "they re ",
)


def normalize(text: str) -> str:
    """The tutorial's normalisation: ASCII letters, lowercase, ``.!?`` split off, the rest dropped."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower().strip()) if unicodedata.category(c) != "Mn")
    text = re.sub(r"([.!?])", r" \1", text)
    return re.sub(r"[^a-zA-Z!?]+", " ", text).strip()


def keep_pair(english: str, french: str) -> bool:
    """The tutorial's filter, on normalised text: both sides under MAX_LENGTH words, English
    starting with one of :data:`ENG_PREFIXES`."""
    e, f = normalize(english), normalize(french)
    return len(e.split(" ")) < MAX_LENGTH and len(f.split(" ")) < MAX_LENGTH and e.startswith(ENG_PREFIXES)


class Lang:
    """Word <-> index from training sentences (normalised, split on spaces)."""

    def __init__(self, sentences: Sequence[str]) -> None:
        self.itos = ["<sos>", "<eos>", "<unk>"]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        for s in sentences:
            for w in s.split(" "):
                if w not in self.stoi:
                    self.stoi[w] = len(self.itos)
                    self.itos.append(w)

    def encode(self, sentence: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in sentence.split(" ")][: MAX_LENGTH - 1] + [EOS]


def to_array(lang: Lang, sentences: Sequence[str]) -> Tensor:
    """(N, MAX_LENGTH) ids padded with 0 (SOS), as the tutorial's arrays are."""
    out = torch.zeros(len(sentences), MAX_LENGTH, dtype=torch.long)
    for i, s in enumerate(sentences):
        ids = lang.encode(s)
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class Encoder(nn.Module):
    def __init__(self, vocab: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # (B, L) -> states (B, L, H), hidden (1, B, H)
        return self.gru(self.dropout(self.embedding(x)))


class Bahdanau(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.wa, self.ua, self.va = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:  # (B, 1, H), (B, L, H)
        scores = self.va(torch.tanh(self.wa(query) + self.ua(keys))).squeeze(2).unsqueeze(1)  # (B, 1, L)
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights, keys), weights  # (B, 1, H)


class Decoder(nn.Module):
    def __init__(self, vocab: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.attention = Bahdanau(hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(dropout)

    def step(self, token: Tensor, hidden: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
        embedded = self.dropout(self.embedding(token))  # (B, 1, H)
        context, _ = self.attention(hidden.permute(1, 0, 2), states)
        output, hidden = self.gru(torch.cat([embedded, context], 2), hidden)
        return self.out(output), hidden  # (B, 1, V)

    def forward(self, states: Tensor, hidden: Tensor, target: Tensor | None = None) -> Tensor:
        """Teacher forcing with ``target`` (B, MAX_LENGTH), else greedy; -> log-probs (B, MAX_LENGTH, V)."""
        token = torch.full((states.shape[0], 1), SOS, dtype=torch.long)
        outs = []
        for i in range(MAX_LENGTH):
            out, hidden = self.step(token, hidden, states)
            outs.append(out)
            token = target[:, i : i + 1] if target is not None else out.argmax(-1).detach()
        return torch.log_softmax(torch.cat(outs, 1), dim=-1)


class TutorialModel:
    """Encoder + decoder + their two Adam optimisers; ``train_step`` and ``translate``."""

    def __init__(self, input_lang: Lang, output_lang: Lang, hidden: int = 128, lr: float = 1e-3) -> None:
        self.input_lang, self.output_lang = input_lang, output_lang
        self.encoder, self.decoder = Encoder(len(input_lang.itos), hidden), Decoder(len(output_lang.itos), hidden)
        self.opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (self.encoder, self.decoder)]
        self.loss_fn = nn.NLLLoss()

    def parameters(self) -> int:
        return sum(p.numel() for m in (self.encoder, self.decoder) for p in m.parameters())

    def train_step(self, source: Tensor, target: Tensor) -> float:
        self.encoder.train(), self.decoder.train()
        for opt in self.opts:
            opt.zero_grad()
        states, hidden = self.encoder(source)
        logp = self.decoder(states, hidden, target)
        loss = self.loss_fn(logp.view(-1, logp.shape[-1]), target.view(-1))
        loss.backward()
        for opt in self.opts:
            opt.step()
        return float(loss)

    @torch.no_grad()
    def translate(self, sentences: Sequence[str], batch_size: int = 256) -> list[str]:
        """Normalised source sentences -> normalised translations (greedy, cut at EOS)."""
        self.encoder.eval(), self.decoder.eval()
        out = []
        for start in range(0, len(sentences), batch_size):
            source = to_array(self.input_lang, sentences[start : start + batch_size])
            states, hidden = self.encoder(source)
            ids = self.decoder(states, hidden).argmax(-1)
            for row in ids.tolist():
                words = []
                for i in row:
                    if i == EOS:
                        break
                    words.append(self.output_lang.itos[i])
                out.append(" ".join(words))
        return out
