"""Data: read files into conversations, render them with the model's chat template, prepare datasets."""
