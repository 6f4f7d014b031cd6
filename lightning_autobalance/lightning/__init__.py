"""The Lightning layer: thin adapters between the Trainer's hooks and the functional core.

``mixin`` (a LightningModule's learnable loss), ``callback`` (the search during ``fit``), what the callback drives
(``schedule``, ``upper_data`` and its ``batch_stream``, ``hyper_optimizer``, ``step_log``, ``check``: the held-back
check at the end of the search), the callback's flat settings of earlier versions (``flat_settings``), the sharded
strategies it refuses (``strategies``) and the ready ``classifier``.
"""
