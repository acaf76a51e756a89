"""genrnn: sequence generation with encoder–decoder recurrent networks."""

__version__ = "0.1.0"
