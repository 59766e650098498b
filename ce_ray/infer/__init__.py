"""Inference: the model resolver, the window planner, batch inpainting, Serve and its page, export,
the MLflow pyfunc, the shipped model."""
