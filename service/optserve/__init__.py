"""optserve: RMSprop (and AdaGrad, SGD) as a service."""

__version__ = "0.1.0"
