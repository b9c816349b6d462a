"""Any timm backbone with a spatial feature map as a captioning encoder (optional extra ``.[timm]``).

ConvNeXt, EfficientNet, RegNet, MobileNet, ResNet variants and other CNNs give a (B, C, h, w)
map; ViT-style models give patch tokens (B, prefix + h*w, C), whose prefix (class/register)
tokens are dropped and the patches laid back on their h x w grid. Either way the result is
the (B, S, C) grid the decoder attends over, row-major like every encoder here.

Pretrained weights come through timm's own mechanism (the Hugging Face Hub cache,
``~/.cache/huggingface/hub`` unless ``HF_HOME``/``HF_HUB_CACHE`` move it), downloaded on first
use when online. Offline (``CAPTIONING_OFFLINE=1``, ``HF_HUB_OFFLINE=1``, ...) only the cache
is read; a missing file is a :class:`captioning.nn.encoders.WeightsNotFoundError` naming what to
put where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from captioning.data.images import Preprocessing
from captioning.nn.encoders import Encoder, WeightsNotFoundError, offline

__all__ = ["TimmEncoder"]


def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "TimmEncoder needs timm: pip install 'attention-captioning[timm]' (or pip install timm)"
        ) from err
    return timm


def _cached_weights(model_name: str) -> Path | None:
    """The cached hub file of ``model_name``'s default pretrained weights, if it is on disk."""
    timm = _timm()
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


class TimmEncoder(Encoder):
    """timm backbone -> (B, grid_size**2, C) features.

    Args:
        model_name: any timm model name with a spatial feature map (``timm.list_models()``),
            e.g. "convnext_tiny", "efficientnet_b0", "regnety_008", "vit_small_patch16_224".
        pretrained: load timm's default pretrained weights (downloaded into the hub cache on
            first use when online; offline only the cache is read).
        weights_path: a local weights file (.safetensors or .pth state dict) instead.
        grid_size: output grid side (adaptive average pooling); None = the model's own grid
            (7x7 for most CNNs at 224 px, 14x14 for ViT-B/16).
        trainable: fine-tune the backbone (False: frozen, eval mode; features can be cached).
        image_size: input side; None = the model's pretrained input size.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        weights_path: str | None = None,
        grid_size: int | None = None,
        trainable: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        timm = _timm()
        if not timm.is_model(model_name.split(".")[0]):  # "name.pretrained_tag" is valid too
            raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models() for valid names")
        if grid_size is not None and grid_size < 1:
            raise ValueError(f"grid_size must be >= 1 or None, got {grid_size}")
        self.config = dict(
            model_name=model_name,
            pretrained=pretrained,
            weights_path=weights_path,
            grid_size=grid_size,
            trainable=trainable,
            image_size=image_size,
        )
        self.model_name, self.trainable = model_name, trainable
        kwargs: dict = dict(num_classes=0, global_pool="")
        if weights_path is not None:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(f"weights file {path} does not exist")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        elif pretrained:
            cached = _cached_weights(model_name)
            if cached is not None:  # read the cache directly: no network round trip at all
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(cached)))
            elif offline():
                raise WeightsNotFoundError(
                    f"pretrained weights of timm model {model_name!r} are not in the Hugging Face cache "
                    f"({_hub_cache_dir()}) and downloads are off (offline mode): run once with a network "
                    "(or copy the cache from a machine that has it), pass weights_path=FILE, or pretrained=False"
                )
            else:
                kwargs.update(pretrained=True)
        model: Any = self._create(model_name, image_size, kwargs)  # a timm model: its attributes vary by family
        self.model: Any = model
        data = timm.data.resolve_model_data_config(model)
        side = image_size or int(data["input_size"][-1])
        self.set_preprocessing(Preprocessing(side, tuple(data["mean"]), tuple(data["std"])))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.out_channels = int(model.num_features)
        native = self._native_grid(side)
        self.grid_size = grid_size or native
        self.pool = nn.AdaptiveAvgPool2d(self.grid_size) if self.grid_size != native else nn.Identity()
        if not trainable:
            self.model.requires_grad_(False)
        self.train(self.training)

    @staticmethod
    def _create(model_name: str, image_size: int | None, kwargs: dict) -> nn.Module:
        timm = _timm()
        try:
            if image_size is not None:
                try:  # ViT-style models fix their input size at creation
                    return timm.create_model(model_name, img_size=image_size, **kwargs)
                except TypeError:
                    pass
            return timm.create_model(model_name, **kwargs)
        except (OSError, RuntimeError) as err:
            if "pretrained_cfg_overlay" in kwargs or not kwargs.get("pretrained"):
                raise ValueError(f"timm model {model_name!r}: cannot load its weights ({err})") from err
            raise WeightsNotFoundError(
                f"pretrained weights of timm model {model_name!r} could not be downloaded into the Hugging Face "
                f"cache ({_hub_cache_dir()}): {err.__class__.__name__}: {err}. Retry with a network, pass "
                "weights_path=FILE, or pretrained=False"
            ) from err

    @torch.no_grad()
    def _native_grid(self, side: int) -> int:
        was = self.model.training
        self.model.eval()
        probe = self.model.forward_features(torch.zeros(1, 3, side, side))
        self.model.train(was)
        return self._as_grid(probe).shape[-1]

    def _as_grid(self, features: Tensor) -> Tensor:
        """forward_features output -> (B, C, h, w)."""
        c = int(self.model.num_features)
        if features.dim() == 3:  # (B, prefix + h*w, C) tokens
            patches = features[:, self.num_prefix_tokens :]
            side = int(round(patches.shape[1] ** 0.5))
            if side * side != patches.shape[1]:
                raise ValueError(f"{self.model_name}: {patches.shape[1]} patch tokens do not form a square grid")
            return patches.transpose(1, 2).reshape(features.shape[0], c, side, side)
        if features.dim() == 4 and features.shape[1] != c and features.shape[-1] == c:  # NHWC models (Swin)
            return features.permute(0, 3, 1, 2)
        if features.dim() == 4:
            return features
        raise ValueError(f"{self.model_name}: forward_features gave shape {tuple(features.shape)}, not a feature map")

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    @classmethod
    def restore_args(cls, init_args: dict) -> dict:
        return {**init_args, "pretrained": False, "weights_path": None}

    def train(self, mode: bool = True) -> TimmEncoder:
        """Like nn.Module.train, but a frozen backbone stays in eval mode (BatchNorm/dropout fixed)."""
        super().train(mode)
        if not self.trainable:
            self.model.train(False)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> (B, grid_size**2, C), positions row-major."""
        grid = self.pool(self._as_grid(self.model.forward_features(x)))
        b, c = grid.shape[:2]
        return grid.permute(0, 2, 3, 1).reshape(b, -1, c)

    def extra_repr(self) -> str:
        return f"model={self.model_name}, grid_size={self.grid_size}, out_channels={self.out_channels}"
