"""Applications: one module per ``dtop`` command (:data:`dtop.cli.APPS`), each exposing its parser
(``add_arguments``) and its run function as an :class:`~dtop.apps.common.App`. They sit above the engine
and may use every other layer (``docs/architecture.md``)."""
