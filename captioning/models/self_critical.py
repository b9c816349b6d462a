"""Self-critical sequence training (Rennie et al. 2017) for the image captioner, and starting a
fit from another checkpoint's weights (``init_from``), which is how it follows cross-entropy.

The steps (:meth:`SelfCriticalTraining.self_critical_losses`): sample K captions per image from
the model (captioning.nn.search.sample_search, no autograd), reward each by its CIDEr-D against
the image's references (captioning.eval.reward), subtract a baseline (the mean reward of the
image's other samples, or the reward of its greedy caption), and raise the log-probabilities of
the samples in proportion to that advantage through one teacher-forced pass over them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from captioning.errors import UserError
from captioning.eval.reward import SelfCriticalReward
from captioning.io.run_folders import callbacks_of
from captioning.nn.search import greedy_search, sample_search

if TYPE_CHECKING:  # what the mixin relies on: the models' base class
    from captioning.models.base import AttentionModel as _ModelBase
else:
    _ModelBase = object


class SelfCriticalTraining(_ModelBase):
    """Mixin of :class:`captioning.models.image_captioner.ImageCaptioner` (its docstring lists the
    options: ``self_critical``, ``scst_samples``, ``scst_baseline``, ``init_from``)."""

    _reward: SelfCriticalReward | None = None
    decoder: Any  # the ImageCaptioner's
    vocab: Any
    loss: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]  # its cross-entropy (features, captions)
    _initial_weights: Path | None = None
    _resumed = False

    def load_initial_weights(self, path: str) -> Path:
        """Start from the weights of a checkpoint (or a run folder's best) of a model of the same
        shape and vocabulary, e.g. the cross-entropy model self-critical training refines.
        A resumed ``fit`` skips this: the resumed checkpoint's weights win."""
        from captioning.io.checkpoint_integrity import find_checkpoint
        from captioning.io.model_loading import check_finite_weights, read_checkpoint, state_dict_problem

        ckpt_file = find_checkpoint(path)
        ckpt = read_checkpoint(ckpt_file)
        theirs = (ckpt["hyper_parameters"] or {}).get("vocab")
        if not isinstance(theirs, dict) or list(theirs.get("itos") or []) != list(self.vocab.itos):
            raise UserError(
                f"init_from {ckpt_file}: its vocabulary is not this model's (point the datamodule's vocab_path "
                "at the vocab.json of the run that wrote it)"
            )
        try:
            self.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as err:
            raise UserError(
                f"init_from {ckpt_file}: its weights do not fit this model ({state_dict_problem(err)}); use the "
                "model settings of the run that wrote it"
            ) from None
        check_finite_weights(self, f"init_from {ckpt_file}")
        return ckpt_file

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resumed = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._initial_weights is not None and not self._resumed:
            rank_zero_info(f"init_from: starting from the weights of {self._initial_weights}")

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._initial_weights is not None and not self._resumed and self.trainer.global_step == 0:
            # The starting weights are a candidate too: a run whose updates never beat them on
            # validation keeps them as its best checkpoint (and tests them) instead of a worse model.
            validate_starting_weights(self.trainer)

    def self_critical_graph_problem(self) -> str | None:
        """Why a self-critical step cannot be a CUDA graph (its rewards are computed on the CPU), or None."""
        return "self-critical training scores its samples on the CPU" if self.hparams.get("self_critical") else None

    def self_critical_losses(
        self, features: Tensor, image_index: Tensor, captions: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Self-critical sequence training on features (B, S, C) of the images at rows ``image_index`` (B,).

        K captions per image are sampled (no autograd), rewarded by CIDEr-D, and their
        log-probabilities raised in proportion to reward minus baseline through one teacher-forced
        pass over the samples: loss = -sum_t (r - b) log p(w_t) / number of words (EOS included).
        Returns ``loss`` and, logged as ``train/*``: ``reward`` (mean sample CIDEr-D), ``baseline``,
        ``greedy_reward`` (baseline greedy), ``sample_diversity`` (distinct samples per image / K),
        and with ``scst_xe_weight`` > 0 ``ce``, the cross-entropy of ``captions`` (B, L) added to the loss.
        """
        assert self._reward is not None
        k, b = int(self.hparams.scst_samples), features.shape[0]
        # No dropout: the samples and the log-probabilities that reward them come from one and the
        # same network (with dropout they would come from two different random masks), which is
        # also the network that captions at test time. Measured: the reward rises about twice as fast.
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            out = self._self_critical_losses(features, image_index, k, b)
            weight = float(self.hparams.get("scst_xe_weight", 0.0) or 0.0)
            if weight > 0 and captions is not None:
                _, out["ce"], _ = self.loss(features, captions)
                out["loss"] = out["loss"] + weight * out["ce"]
            return out
        finally:
            self.decoder.train(was_training)

    def _self_critical_losses(self, features: Tensor, image_index: Tensor, k: int, b: int) -> dict[str, Tensor]:
        hp, v, reward = self.hparams, self.vocab, self._reward
        assert reward is not None
        with torch.no_grad():
            memory = self.decoder.prepare_memory(features)
            common = dict(bos_id=v.bos_id, eos_id=v.eos_id, pad_id=v.pad_id, max_length=hp.max_length)
            samples = sample_search(self.decoder, memory, b, num_samples=k, banned_ids=self.banned_ids(None), **common)
            rewards = reward.score(samples.tokens, image_index.repeat_interleave(k)).view(b, k)
            out: dict[str, Tensor] = {}
            if hp.scst_baseline == "greedy":  # the caption the model would give
                greedy = greedy_search(self.decoder, memory, b, banned_ids=self.banned_ids(None), **common)
                baseline = reward.score(greedy.tokens, image_index).unsqueeze(1).expand(b, k)
                out["greedy_reward"] = baseline[:, 0].mean()
            else:  # each sample's baseline: the mean reward of the image's other samples
                baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
            advantage = (rewards - baseline).reshape(-1)  # (B*K,)
        tokens = samples.tokens  # (B*K, T), EOS included, PAD after it
        bos = torch.full_like(tokens[:, :1], v.bos_id)
        inputs = torch.cat([bos, tokens[:, :-1]], 1)
        real = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < samples.lengths.unsqueeze(1)
        dec_out, _, _ = self.decoder.teacher_forced(features.repeat_interleave(k, 0), inputs, steps=real.sum(1))
        log_p = self.token_log_probs(self.decoder, dec_out, tokens, real)  # (N,) the real words'
        weights = advantage.to(log_p.dtype).unsqueeze(1).expand_as(real)[real]
        loss = -(weights * log_p).sum() / real.sum().clamp(min=1)
        distinct = [len({tuple(r) for r in rows}) for rows in tokens.view(b, k, -1).tolist()]
        out.update(
            loss=loss,
            reward=rewards.mean(),
            baseline=baseline.mean(),
            sample_diversity=torch.tensor(sum(distinct) / (b * k), device=loss.device),
        )
        return out


def validate_starting_weights(trainer: pl.Trainer) -> None:
    """Validate the weights a fit starts from before its first step, as a validation during
    training: each ModelCheckpoint can keep them as the best checkpoint, and EarlyStopping judges
    later validations against them.

    For a fit that starts from trained weights (``init_from``, such as self-critical training
    after cross-entropy) the first validation otherwise comes after some updates, so a run whose
    updates never help (SCST on a small set, docs/results.md) would hand back, and test, a model
    below the one it started from. Lightning validates only after steps, and its ModelCheckpoint
    skips step 0 ("no steps taken"); that skip is lifted for this one validation (a private
    attribute, listed in captioning/commands/lightning_adapter.py)."""
    for saver in trainer.checkpoint_callbacks:
        if isinstance(saver, ModelCheckpoint) and saver._last_global_step_saved == trainer.global_step:
            saver._last_global_step_saved = -1
    loop = trainer.fit_loop.epoch_loop.val_loop
    trainer.validating = True  # as Lightning's own validation inside the training loop
    try:
        loop.run()
    finally:
        trainer.training = True
    if loop.skip:  # no validation batches: nothing to judge
        return
    # Callbacks that judge a validation at the end of the training epoch (Lightning's choice when
    # val_check_interval is 1.0) judge this one now; their epoch-end hook does nothing otherwise.
    for judge in callbacks_of(trainer):
        if isinstance(judge, (ModelCheckpoint, EarlyStopping)):
            judge.on_train_epoch_end(trainer, trainer.lightning_module)
