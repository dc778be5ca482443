"""Callbacks that put MAS into the training loops of other libraries.

- :mod:`mas_ext.integrations.transformers`: ``MASCallback`` for the Hugging Face ``Trainer``.
- :mod:`mas_ext.integrations.lightning`: ``MASCallback`` for the Lightning ``Trainer``.

Each callback adds the penalty gradient 2λΩ(θ−θ*) before every optimizer step (unless the optimizer is a
``mas_ext.optim`` one holding the same MAS, which applies it in its fused step) and, given
``importance_data``, accumulates Ω and consolidates at the end of training, so that a sequence of
``train()``/``fit()`` calls is a continual-learning run. The MAS object must be built on the model the
trainer trains (the same module object), after it is on the device it trains on.

Nothing here is imported by ``import mas_ext``; each module imports its library when it is imported
itself, and raises an ImportError naming the pip package when that library is missing.
"""
