"""Figures drawn from the files the stages write (manifests, statistics, metrics)."""
