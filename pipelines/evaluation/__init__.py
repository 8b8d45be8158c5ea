"""Evaluation of served or in-process models with and without ART (NIAH), recorded in MLflow."""
