"""How good the output is: COCO caption metrics, text metrics, and the pointing game (does the
model look at what it names)."""
