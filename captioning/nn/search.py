"""Greedy, batched beam and sampled search, shared by the image captioner and the text seq2seq model.
(Over 400 lines on purpose: the three searches share one step machinery, the CUDA-graph runner,
state copies, per-step histories, length caps and repetition blocking, and are read together.)

Both drive any decoder with the step interface, :class:`StepDecoder`::

    memory = decoder.prepare_memory(...)          # batch-first tensors, computed once
    state = decoder.init_state(memory)            # (N, ...) tensors
    out = decoder.step(tokens, state, memory)     # tokens (N,) -> StepOutput(logits (N, V), alpha (N, S),
                                                  #                          state, beta (N,) or None)

Memory and state are the decoder's own types: NamedTuples (both decoders'
``DecoderMemory``/``DecoderState``) or dicts; search only reorders and repeats the tensors
inside them (:func:`map_tensors`), so any nest of dicts/tuples/NamedTuples works. A ``step``
may also return a plain ``(logits, alpha, state)`` tuple (no beta).

Beam search keeps all images x beams in one (B*K) batch: every step is a handful of tensor
ops (one top-k over K*V candidates per image, one gather to reorder states), no Python loop
over images or beams, and no host-device sync except one every 4 steps to stop early.
Words and backpointers are recorded per step and the hypotheses read back once at the end
(no per-step copy of the histories). Finished beams stay in their slot and can only be
extended by padding at zero cost, so a batch never crashes when no beam emits EOS; it just
stops at ``max_length``. Each image's result depends only on that image (rows never mix).

A step reads and writes only tensors allocated before the first step (tokens, scores, the
decoder's state, the histories, a step counter on the device), so on CUDA the first step runs
as usual and every later one is a replay of it captured as a CUDA graph (``graphs``): a step
of a few dozen small kernels becomes one launch.

Optional decoder hook (:class:`ExpandsMemory`): ``decoder.expand_memory(memory, K)`` returns
the memory for K hypotheses per item (e.g. without copying the image grid); without it every
memory tensor is repeated K times. Search normalises the step's logits in place: ``step`` must
return a fresh tensor (any layer output is), not a view of something it keeps.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from captioning.nn.repeats import block_repeats

MemoryT = TypeVar("MemoryT")
StateT = TypeVar("StateT")


class StepOutput(NamedTuple):
    """What ``step`` returns: logits (N, V) for the next word; alpha (N, S) the attention that
    produced them (over the memory alone); state: the new state; beta (N,) the weight of an
    extra attended position (the visual sentinel), or None."""

    logits: Tensor
    alpha: Tensor
    state: Any
    beta: Tensor | None = None


@runtime_checkable
class StepDecoder(Protocol[MemoryT, StateT]):
    """The contract search drives (both decoders implement it).

    ``prepare_memory(...)`` -> MemoryT: the step-invariant part, batch-first tensors (its
    arguments are the decoder's own). ``init_state(memory)`` -> StateT: (N, ...) tensors.
    ``step(tokens (N,), state, memory)`` -> :class:`StepOutput` (or ``(logits, alpha, state)``).
    """

    def prepare_memory(self, *args: Any, **kwargs: Any) -> MemoryT: ...

    def init_state(self, memory: MemoryT) -> StateT: ...

    def step(self, tokens: Tensor, state: StateT, memory: MemoryT) -> StepOutput: ...


@runtime_checkable
class ExpandsMemory(Protocol[MemoryT]):
    """Optional: memory for K hypotheses per item (beam search; greedy calls it with K = 1)."""

    def expand_memory(self, memory: MemoryT, beam_size: int) -> MemoryT: ...


class SearchResult(NamedTuple):
    """tokens (B, T) without BOS, EOS included when produced, padded with pad_id after it;
    lengths (B,) tokens up to and including EOS; scores (B,) sum of log-probabilities
    (length-normalised for beam search when ``length_penalty`` > 0); alphas (B, T, S);
    betas (B, T) the sentinel weight of each word when the decoder has one, else None."""

    tokens: Tensor
    lengths: Tensor
    scores: Tensor
    alphas: Tensor
    betas: Tensor | None = None


def _step(decoder: StepDecoder, tokens: Tensor, state: Any, memory: Any) -> tuple[Tensor, Tensor, Any, Tensor | None]:
    out = decoder.step(tokens, state, memory)
    return out[0], out[1], out[2], getattr(out, "beta", None)


def map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of dicts/tuples/NamedTuples; other leaves pass."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def _leaves(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)


def _copy_state(static: Any, new: Any, rows: Tensor | None = None) -> None:
    """Copy the decoder's new state into the search's own state tensors (same structure), in
    place, taking ``rows`` (beam reordering) when given."""
    for mine, theirs in zip(_leaves(static), _leaves(new)):
        mine.copy_(theirs if rows is None else theirs.index_select(0, rows))


def _lengths(tokens: Tensor, eos_id: int) -> Tensor:
    """(B, T) -> (B,) position of the first EOS + 1, or T when there is none."""
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(tokens[:, 0], tokens.shape[1] - 1))
    return first + 1


def _cap(logits: Tensor, step: Tensor, limits: Tensor | None, eos_id: int) -> Tensor:
    """Per-item length caps: a row whose item has produced ``limits - 1`` tokens may only emit EOS.
    logits (N, V); step: 0-dim (on the device); limits (N,) tokens incl. EOS, or None. No host sync."""
    if limits is None:
        return logits
    only_eos = torch.full_like(logits[:1], float("-inf"))
    only_eos[0, eos_id] = 0.0
    return torch.where((limits <= step + 1).unsqueeze(1), only_eos, logits)


def _banned(ids: Sequence[int], device: torch.device) -> Tensor | None:
    return torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long, device=device) if len(ids) else None


def _check_ngram(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"no_repeat_ngram must be a whole number >= 0 (0 = off), got {n!r}")


def length_normaliser(lengths: Tensor, length_penalty: float) -> Tensor:
    """GNMT length penalty ((5 + len) / 6) ** alpha; alpha = 0 disables it."""
    return ((5.0 + lengths.float()) / 6.0) ** length_penalty


def _backend(graphs: str | None, device: torch.device) -> str:
    """``graphs``: "cuda" (capture the step as a CUDA graph), "eager" (tests: replay calls the
    step), "off"; None: "cuda" on CUDA devices (unless CAPTIONING_SEARCH_GRAPHS=0), else "off"."""
    if graphs is None:
        on = device.type == "cuda" and os.environ.get("CAPTIONING_SEARCH_GRAPHS", "1") != "0"
        return "cuda" if on else "off"
    if graphs not in ("cuda", "eager", "off"):
        raise ValueError(f"graphs must be 'cuda', 'eager' or 'off', got {graphs!r}")
    return graphs


def _run(step: Callable[[], None], finished: Tensor, max_length: int, backend: str) -> int:
    """Run up to ``max_length`` steps (the first eagerly; with graphs the others as replays of
    it); stop early, with one host sync every 4 steps, once every row is finished. Returns the
    number of steps run."""
    if backend != "cuda":
        for i in range(max_length):
            step()
            if i % 4 == 3 and bool(finished.all()):
                return i + 1
        return max_length
    side = torch.cuda.Stream(device=finished.device)
    side.wait_stream(torch.cuda.current_stream(finished.device))
    with torch.cuda.stream(side):  # warm-up, capture and replays on one side stream
        run: Callable[[], None] | None = None
        for i in range(max_length):
            if run is None and i > 0:
                run = _captured(step)
            (run or step)()
            if i % 4 == 3 and bool(finished.all()):
                break
    torch.cuda.current_stream(finished.device).wait_stream(side)
    return i + 1


def _captured(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured as a CUDA graph (its replay), or ``step`` itself when it cannot be
    captured (a decoder that reads the device on the host): nothing ran during the attempt."""
    graph = torch.cuda.CUDAGraph()
    try:
        graph.capture_begin()
        try:
            step()
        finally:
            graph.capture_end()
    except RuntimeError as err:
        warnings.warn(f"search step could not be captured as a CUDA graph ({err}); it runs eagerly", stacklevel=3)
        return step
    return graph.replay


@torch.no_grad()
def greedy_search(
    decoder: StepDecoder,
    memory: Any,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    max_length: int = 50,
    banned_ids: Sequence[int] = (),
    max_lengths: Tensor | None = None,
    graphs: str | None = None,
    no_repeat_ngram: int = 0,
    repeatable: Tensor | None = None,
) -> SearchResult:
    """Pick the most likely word at every step, for the whole batch at once.

    ``banned_ids``: tokens never emitted (e.g. ``<unk>``): their probability is set to 0 and
    the others renormalised, at every step. ``max_lengths`` (B,): each item's own cap (tokens
    incl. EOS; once reached only EOS may follow), so an item's output does not depend on its batch.
    ``graphs``: see the module docstring (None: CUDA graphs on CUDA devices).
    ``no_repeat_ngram``: n > 0 never emits an n-gram an item has already produced (0: off),
    except the n-grams whose sorted keys ``repeatable`` holds (captioning.nn.repeats).
    """
    _check_ngram(no_repeat_ngram)
    expand = getattr(decoder, "expand_memory", None)
    memory = expand(memory, 1) if expand is not None else memory

    def most_likely(logits: Tensor) -> tuple[Tensor, Tensor]:
        best, chosen = logits.max(-1)
        return chosen, best - torch.logsumexp(logits, -1)  # log_softmax of the best word only

    return _word_by_word(
        decoder, memory, batch_size, bos_id, eos_id, pad_id, max_length, banned_ids, max_lengths,
        no_repeat_ngram, repeatable, most_likely, graphs,
    )  # fmt: skip


def _word_by_word(
    decoder: StepDecoder,
    memory: Any,
    rows: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    banned_ids: Sequence[int],
    max_lengths: Tensor | None,
    no_repeat_ngram: int,
    repeatable: Tensor | None,
    pick: Callable[[Tensor], tuple[Tensor, Tensor]],
    graphs: str | None,
) -> SearchResult:
    """One hypothesis per row (greedy, sampling): ``pick(logits (N, V))`` -> (word (N,), its
    log-probability (N,)) chooses each row's next word; ``memory`` already has ``rows`` rows."""
    state = decoder.init_state(memory)
    device = next(t for t in _leaves(state)).device
    banned = _banned(banned_ids, device)
    repeatable = None if repeatable is None else repeatable.to(device)
    limits = None if max_lengths is None else max_lengths.to(device)
    tokens = torch.full((rows,), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    scores = torch.zeros(rows, device=device)
    t = torch.zeros((), dtype=torch.long, device=device)
    out_tokens = torch.full((max_length, rows), pad_id, dtype=torch.long, device=device)
    history: dict[str, Tensor] = {}

    def step() -> None:
        logits, alpha, new_state, beta = _step(decoder, tokens, state, memory)
        logits = logits.float()
        if banned is not None:
            logits.index_fill_(-1, banned, float("-inf"))
        if no_repeat_ngram:
            logits = block_repeats(logits, out_tokens.t(), t, no_repeat_ngram, eos_id, repeatable)
        chosen, logp = pick(_cap(logits, t, limits, eos_id))
        chosen = chosen.masked_fill(finished, pad_id)
        scores.add_(logp.masked_fill(finished, 0.0))
        _record(history, t, max_length, alpha=alpha.float(), beta=None if beta is None else beta.float())
        out_tokens.index_copy_(0, t.view(1), chosen.unsqueeze(0))
        finished.logical_or_(chosen == eos_id)
        tokens.copy_(chosen)
        _copy_state(state, new_state)
        t.add_(1)

    n = _run(step, finished, max_length, _backend(graphs, device))
    toks = out_tokens[:n].t()
    betas = history["beta"][:n].transpose(0, 1) if "beta" in history else None
    return SearchResult(toks, _lengths(toks, eos_id), scores, history["alpha"][:n].transpose(0, 1), betas)


def _record(history: dict[str, Tensor], t: Tensor, length: int, **rows: Tensor | None) -> None:
    """Write this step's rows into (length, ...) histories at the device step ``t`` (allocated on the
    first step, before any capture)."""
    for name, row in rows.items():
        if row is None:
            continue
        if name not in history:
            history[name] = row.new_zeros(length, *row.shape)
        history[name].index_copy_(0, t.view(1), row.unsqueeze(0))


@torch.no_grad()
def beam_search(
    decoder: StepDecoder,
    memory: Any,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    beam_size: int = 3,
    max_length: int = 50,
    length_penalty: float = 0.0,
    banned_ids: Sequence[int] = (),
    max_lengths: Tensor | None = None,
    graphs: str | None = None,
    no_repeat_ngram: int = 0,
    repeatable: Tensor | None = None,
) -> SearchResult:
    """Batched beam search: all B images and K beams advance together.

    Args:
        memory: from ``decoder.prepare_memory`` for B items. Expanded to K hypotheses per item
            once: by ``decoder.expand_memory(memory, K)`` when the decoder has it (it may avoid
            copying, e.g. by attending with an item's K queries at once), else every tensor
            is repeated K times along the batch.
        length_penalty: GNMT alpha applied when choosing among finished hypotheses.
        banned_ids: tokens never emitted (e.g. ``<unk>``): probability 0, the rest renormalised.
        max_lengths: (B,) each item's own cap (tokens incl. EOS), or None: ``max_length`` for all.
        graphs: see the module docstring (None: CUDA graphs on CUDA devices).
        no_repeat_ngram: n > 0: no hypothesis ever holds the same n-gram twice (0: off). Each
            slot's words are kept in a (B*K, max_length) buffer reordered with the beams.
        repeatable: sorted keys of the n-grams that may repeat anyway (captioning.nn.repeats), or None.
    Returns:
        the best hypothesis per item (see :class:`SearchResult`), with the attention (and the
        sentinel weight) that produced each of its words.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    _check_ngram(no_repeat_ngram)
    b, k = batch_size, beam_size
    expand = getattr(decoder, "expand_memory", None)
    memory = expand(memory, k) if expand is not None else map_tensors(lambda x: x.repeat_interleave(k, 0), memory)
    state = decoder.init_state(memory)
    device = next(x for x in _leaves(state)).device
    banned = _banned(banned_ids, device)
    repeatable = None if repeatable is None else repeatable.to(device)
    limits = None if max_lengths is None else max_lengths.to(device).repeat_interleave(k)  # (B*K,)
    tokens = torch.full((b * k,), bos_id, dtype=torch.long, device=device)
    # Only beam 0 is alive at the start, so the first top-k does not pick K copies of one word.
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    base = (torch.arange(b, device=device) * k).unsqueeze(1)  # (B, 1) offset of each item's beams
    t = torch.zeros((), dtype=torch.long, device=device)
    # Per step: the word chosen in each slot, the slot it extends (backpointer), and the
    # attention of every slot. Hypotheses are read back once at the end, so no step copies
    # the whole history.
    history: dict[str, Tensor] = {}
    words_so_far = torch.full((b * k, max_length), pad_id, dtype=torch.long, device=device) if no_repeat_ngram else None

    def step() -> None:
        logits, alpha, new_state, beta = _step(decoder, tokens, state, memory)
        logits = logits.float()
        if banned is not None:
            logits.index_fill_(-1, banned, float("-inf"))
        if words_so_far is not None:
            logits = block_repeats(logits, words_so_far, t, no_repeat_ngram, eos_id, repeatable)
        logits = _cap(logits, t, limits, eos_id)
        logp = torch.log_softmax(logits, -1).view(b, k, -1)  # (B, K, V); then in place
        vocab = logp.shape[-1]
        # A finished beam continues only with PAD at no cost: it keeps its score and slot.
        pad_logp = torch.where(finished, 0.0, logp[:, :, pad_id])
        logp.masked_fill_(finished.unsqueeze(-1), float("-inf"))
        logp[:, :, pad_id] = pad_logp
        candidates = logp.add_(scores.unsqueeze(-1)).view(b, k * vocab)
        best, flat = candidates.topk(k, dim=1)  # (B, K)
        origin, chosen = flat // vocab, flat % vocab  # which beam each came from, its word
        _copy_state(state, new_state, (base + origin).view(-1))
        _record(
            history,
            t,
            max_length,
            tokens=chosen,
            origins=origin,
            alpha=alpha.float().view(b, k, -1),
            beta=None if beta is None else beta.float().view(b, k),
        )
        if words_so_far is not None:  # each slot now holds the hypothesis it extended, plus its word
            words_so_far.copy_(words_so_far.index_select(0, (base + origin).view(-1)))
            words_so_far.index_copy_(1, t.view(1), chosen.view(-1, 1))
        finished.copy_(finished.gather(1, origin) | (chosen == eos_id))
        scores.copy_(best)
        tokens.copy_(chosen.view(-1))
        t.add_(1)

    n = _run(step, finished, max_length, _backend(graphs, device))
    words, slots = _backtrack(history["tokens"][:n], history["origins"][:n])  # (B, K, T) each
    lengths = _lengths(words.view(b * k, -1), eos_id).view(b, k)
    final = scores / length_normaliser(lengths, length_penalty)
    best = final.argmax(1, keepdim=True)  # (B, 1)
    tokens_out = words.gather(1, best.unsqueeze(-1).expand(-1, 1, words.shape[2])).squeeze(1)  # (B, T)
    # The attention that produced word t of the best hypothesis: that of its parent slot at step t.
    parent = slots.gather(1, best.unsqueeze(-1).expand(-1, 1, slots.shape[2])).squeeze(1)  # (B, T)
    alphas = history["alpha"][:n].transpose(0, 1)  # (B, T, K, S)
    alphas_out = alphas.gather(2, parent[:, :, None, None].expand(-1, -1, 1, alphas.shape[-1])).squeeze(2)
    betas_out = None
    if "beta" in history:  # (B, T, K) -> the parent slot's beta, like alpha
        betas_out = history["beta"][:n].transpose(0, 1).gather(2, parent.unsqueeze(-1)).squeeze(2)
    return SearchResult(
        tokens_out, lengths.gather(1, best).squeeze(1), final.gather(1, best).squeeze(1), alphas_out, betas_out
    )


def _backtrack(step_tokens: Tensor, step_origins: Tensor) -> tuple[Tensor, Tensor]:
    """Follow backpointers from the final slots: tokens (T, B, K) and origins (T, B, K) per step.

    Returns (history (B, K, T) the words of each final hypothesis, parents (B, K, T) the slot
    whose state produced word t, i.e. whose attention belongs to that word).
    """
    slot = torch.arange(step_tokens.shape[2], device=step_tokens.device).expand_as(step_tokens[0])
    words, parents = [], []
    for tokens, origin in zip(reversed(step_tokens), reversed(step_origins)):
        words.append(tokens.gather(1, slot))
        slot = origin.gather(1, slot)
        parents.append(slot)
    return torch.stack(words[::-1], 2), torch.stack(parents[::-1], 2)


@torch.no_grad()
def sample_search(
    decoder: StepDecoder,
    memory: Any,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    num_samples: int = 5,
    max_length: int = 50,
    banned_ids: Sequence[int] = (),
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SearchResult:
    """``num_samples`` captions per item drawn from the model's own distribution, word by word
    (self-critical training): rows ``i*K .. i*K+K-1`` of the result are item i's K samples.

    ``scores`` are the samples' log-probabilities (sum over their words, EOS included); the
    gradient-carrying log-probabilities come from a teacher-forced pass over the samples (the
    caller's), so this runs without autograd. Every step reads the device once every 4 steps,
    like the other searches; no CUDA graph (the sampler's random state advances on the host).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = num_samples
    expand = getattr(decoder, "expand_memory", None)
    memory = expand(memory, k) if expand is not None else map_tensors(lambda x: x.repeat_interleave(k, 0), memory)

    def draw(logits: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(logits / temperature, -1)
        chosen = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        return chosen, logp.gather(1, chosen.unsqueeze(1)).squeeze(1)

    return _word_by_word(
        decoder, memory, batch_size * k, bos_id, eos_id, pad_id, max_length, banned_ids, None, 0, None, draw, "off"
    )
