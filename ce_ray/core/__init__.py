"""The pure-torch core: masks and fills, the Context Encoder model, losses, the GAN step, metrics,
classical fills. No Ray, no MLflow, no files."""
