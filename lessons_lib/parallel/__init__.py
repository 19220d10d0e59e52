"""Parallelism applied to a plain model from outside: data, tensor and pipeline parallel,
and the mesh of process groups they share. Import the submodule you need."""
