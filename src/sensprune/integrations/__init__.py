"""sensprune inside the training frameworks users train with: a Lightning callback
(``integrations.lightning.SensitivityPruning``) and a Hugging Face ``Trainer`` callback
(``integrations.transformers.SensitivityPruningCallback``). Both stand on the library's own-loop
parts (``SensitivityRegularizer``, ``Pruner``, the cubic schedule) through ``core.py``, never
on ``train.py``; the frameworks are imported only by their own module."""
