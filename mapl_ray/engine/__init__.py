"""The training engine: the loop, the step (CUDA graph), the LR schedule, the weight EMA and the batch loader."""
