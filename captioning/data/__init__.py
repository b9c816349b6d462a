"""Data in: vocabularies and tokenizers, image files, the feature cache, and the
LightningDataModules (built-in shapes, COCO/Karpathy, your own folder, cached features, text pairs)."""
