"""The barrier-mode distributed trainer: ``streamhydro train --config FILE``.

The tree mirrors the processes:

- driver (once per ``train`` run): :mod:`.config` (the TOML file), :mod:`.data` (reading the
  training data with Spark), :mod:`.launch` (start checks, the barrier stage, retries),
  :mod:`.publish` (provenance, metrics, and :func:`streamhydro.models_add.add_model`), :mod:`.command` (the CLI);
- trainer ranks (one Python worker per rank, inside a barrier ``mapInArrow`` task, once per
  stage attempt): :mod:`.rank` (rendezvous, the DDP training loop, checkpoints, ONNX export);
- both: :mod:`.model` (the network, shared by training and export), :mod:`.plan` (the frozen,
  picklable description of the work the driver hands to every rank), :mod:`.errors`.
"""
