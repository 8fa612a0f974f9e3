"""Inference: predict images with a trained model, post-process, tile, tune thresholds, write submissions."""
