"""python layers."""
