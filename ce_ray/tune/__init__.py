"""Sweeps: the sweep file schema and the Ray Tune runner."""
