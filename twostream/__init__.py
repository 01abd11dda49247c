"""Pieces shared by flowprep and trainer: configuration schemas, the pipeline file, atomic writes."""
