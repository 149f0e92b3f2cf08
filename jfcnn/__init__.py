"""jfcnn: fully convolutional networks for image analysis in JAX/Flax."""

__version__ = "0.1.0"
