"""Inference: sliding-window and slice-by-slice prediction, padding, flip test-time augmentation."""
