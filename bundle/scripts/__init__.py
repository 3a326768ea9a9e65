"""Helpers for the breast ultrasound segmentation + classification bundle: only what MONAI lacks."""
