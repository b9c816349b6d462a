"""The LightningModules: the image captioner and the text seq2seq model, what they share (the
evaluation, the optimiser, the training step and its CUDA graphs), and the callbacks that draw
where they looked. The maths they train lives in :mod:`captioning.nn`."""

from captioning.models.image_captioner import ImageCaptioner
from captioning.models.seq2seq import Seq2SeqModel

__all__ = ["ImageCaptioner", "Seq2SeqModel"]
