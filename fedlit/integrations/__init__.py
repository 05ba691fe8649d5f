"""Bridges from fedlit to other federated-learning runtimes (optional extras).

- :mod:`fedlit.integrations.flower` — run a fedlit method as a real Flower federation (the ClientApp, and the
  strategy: a translator between Flower messages and :class:`fedlit.rounds.RoundProtocol`);
  :mod:`fedlit.integrations.flower_records` — tensors ⇄ records, the per-process runtime, SuperNode discovery;
  :mod:`fedlit.integrations.flower_deploy` — app directory, deployment commands, `fedlit flower`
  (``pip install 'fedlit[flower]'``; ``fedlit flower --config …``).
"""
