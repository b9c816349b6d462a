"""The maths of the models as plain ``nn.Module``s and functions: score functions, the attention
layer, the attention-LSTM decoders and their teacher-forced recurrence, fused GPU kernels.
Nothing here knows about Lightning, files or the command line."""
