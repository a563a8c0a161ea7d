"""The batch-size study behind ``hvd-largebatch bench``: an application of the library, not part of it.

It measures, for each training recipe and global batch size, the steps the
same small 1-D CNN needs to reach a target validation accuracy on MNIST-1D
under Horovod, in PyTorch or Keras, tuned per (method, batch) and repeated
over seeds, and fits the critical batch. Its modules, one job each:

* :mod:`~hvd_largebatch.bench.recipes`: the compared methods and every hyperparameter;
* :mod:`~hvd_largebatch.bench.study`: the study's settings, its runs and the scheduler that picks the next one;
* :mod:`~hvd_largebatch.bench.tuning`: the per-cell trials (quasi-random search) and the best-trial rule;
* :mod:`~hvd_largebatch.bench.targets`: the evaluation steps and steps to a target;
* :mod:`~hvd_largebatch.bench.run_monitor`: what a run measures and when it stops (target, divergence, budget);
* :mod:`~hvd_largebatch.bench.noise_estimate`: the gradient noise scale ``B_simple`` of a run;
* :mod:`~hvd_largebatch.bench.scaling_fit`: the fit ``S(B) = S_min (1 + B_crit/B)``;
* :mod:`~hvd_largebatch.bench.plan`: the command line's lists and their checks;
* :mod:`~hvd_largebatch.bench.launch`: starts ``horovodrun`` (or runs inside one), resumes, reports;
* :mod:`~hvd_largebatch.bench.worker`: what every rank runs;
* :mod:`~hvd_largebatch.bench.results`, :mod:`~hvd_largebatch.bench.report`: the output directory and its tables and plots;
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
