"""Offline data: packaged models and datasets, training tables from files, haystacks and NIAH prompts."""
