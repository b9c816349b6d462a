"""Files the models leave and read: checkpoints (written atomically, read with ``weights_only``),
exported model folders and the Hub, what a model file may build (trust), run folders, model
cards, W&B logging, and the outputs of the commands."""
