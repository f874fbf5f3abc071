"""Probe kernels: short PyTorch measurements of a GPU's matmul rate, memory bandwidth and
kernel-launch latency.

They serve hardware identity (an idle GPU must deliver roughly its SKU's rates) and
contention (how much a probe slows down while the tenant works). Layout:

* :mod:`agent.probes.kernels` and :mod:`agent.probes.worker` import torch and run only in a
  short-lived worker process, so no CUDA context or device memory outlives a probe round;
* everything else here is torch-free and safe to import in the sampling daemon:
  :mod:`~agent.probes.measurement` (what a probe reports), :mod:`~agent.probes.confidence`
  (repeat to a stated confidence), :mod:`~agent.probes.reference` (SKU reference, ratio and
  identity), :mod:`~agent.probes.governor` (duty-cycle budget), :mod:`~agent.probes.runner`
  (spawn the worker) and :mod:`~agent.probes.scheduler` (the daemon's side of it all).
"""
