"""Runnable examples; a regular package, so that another distribution's top-level ``examples``
(Opacus installs one) cannot shadow ``import examples.digits`` in the tests and benchmarks."""
