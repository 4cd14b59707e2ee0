"""Datasets shared by the task runners."""
