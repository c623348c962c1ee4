"""samlora: Segment Anything adapted to microscopy with LoRA, as one package in layers.

Lowest first: core -> data -> metrics -> models -> inference -> training -> evaluation. A module
imports only from its own layer or lower ones, never a command module at the repository root
(tests/test_layers.py holds this).
"""
