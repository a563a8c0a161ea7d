"""The batch-size sweep app behind ``hvd-largebatch bench``: an application of the library, not part of it.

It trains the same small 1-D CNN on MNIST-1D with each training recipe at each
global batch size under Horovod, in PyTorch or Keras, and reports test accuracy
against batch size. Its modules, one job each:

* :mod:`~hvd_largebatch.bench.recipes`: the compared methods and every hyperparameter;
* :mod:`~hvd_largebatch.bench.plan`: the sweep's settings and its cells;
* :mod:`~hvd_largebatch.bench.launch`: starts ``horovodrun`` (or runs inside one), resumes, reports;
* :mod:`~hvd_largebatch.bench.worker`: what every rank runs;
* :mod:`~hvd_largebatch.bench.results`, :mod:`~hvd_largebatch.bench.report`: the output directory and its tables and plot;
* :mod:`~hvd_largebatch.bench.atomic_file`: all-or-nothing file writes;
* :mod:`~hvd_largebatch.bench.data`: MNIST-1D, cached, and the per-rank sharding of each global batch;
* :mod:`~hvd_largebatch.bench.model_spec`: the CNN, written down once;
* :mod:`~hvd_largebatch.bench.command`: the ``hvd-largebatch bench`` sub-command;
* :mod:`~hvd_largebatch.bench.torch_runner`, :mod:`~hvd_largebatch.bench.keras_runner` and the model
  twins :mod:`~hvd_largebatch.bench.torch_model`, :mod:`~hvd_largebatch.bench.keras_model`: the only
  modules that import a framework; the worker imports a runner by name, so importing this
  package (and every module above) needs neither torch nor TensorFlow nor Horovod.

The framework libraries (:mod:`hvd_largebatch.torch_impl`, :mod:`hvd_largebatch.tf`) never
import this package.
"""
