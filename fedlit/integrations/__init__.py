"""Bridges from fedlit to other federated-learning runtimes (optional extras).

- :mod:`fedlit.integrations.flower` — run a fedlit method as a real Flower federation
  (``pip install 'fedlit[flower]'``; ``fedlit flower --config …``).
"""
