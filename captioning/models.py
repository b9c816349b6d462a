"""Former name of :mod:`captioning.image_model`, kept so that run configs (``config.yaml``) and
code written for it keep working. New code imports ``captioning.image_model``."""

import warnings

from captioning.image_model import ImageCaptioner, compile_decoder_step  # noqa: F401

warnings.warn("captioning.models was renamed captioning.image_model (class_path: "
              "captioning.image_model.ImageCaptioner); the old name will be removed", FutureWarning, stacklevel=2)
