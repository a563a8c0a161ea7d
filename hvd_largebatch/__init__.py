"""hvd_largebatch: large-batch data-parallel training on Horovod for Keras 3 and PyTorch.

This top-level package is framework-free (standard library and NumPy only):
``schedules`` (LR scaling, Goyal warmup, decays), ``config`` (validated
hyperparameters and exclusion rules), ``reference`` (the float64 oracle of
every update rule), ``cli`` (the ``hvd-largebatch`` command), and for elastic
training ``schedules.ElasticSchedule`` (the LR recipe counted in examples,
for a changing global batch) and ``elastic_data`` (the position in the epoch
and each rank's examples for any world size). The framework
implementations live in ``hvd_largebatch.torch_impl`` and ``hvd_largebatch.tf``
and are imported only on request. ``hvd_largebatch.bench`` is an application
of the libraries (the batch-size sweep behind ``hvd-largebatch bench``), not
part of them; see docs/architecture.md.
"""

from hvd_largebatch import config, reference, schedules

__all__ = ["config", "reference", "schedules", "__version__"]

__version__ = "0.1.0"
