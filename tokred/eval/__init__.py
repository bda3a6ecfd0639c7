"""Evaluation: accuracy of reduced models."""
