"""Plots and interactive views: training curves, mask overlays, the mask browser."""
