"""winnow Beam pipelines."""
