"""Pure, jit-able, differentiable JAX ops used by jfcnn models.

This package imports only JAX and NumPy (never TensorFlow), so other JAX
projects can depend on it cheaply.
"""
