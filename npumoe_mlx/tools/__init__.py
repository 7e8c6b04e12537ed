"""Tools around the runtime (as mlx-lm keeps ``quant/`` and ``tuner/``): the tiny-model
factory, ``compare``, the benchmarks, the demo and their meters. The runtime never
imports from here."""
