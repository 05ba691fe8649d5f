"""Bridges from fedlit to other federated-learning runtimes (optional extras).

- :mod:`fedlit.integrations.flower` — run a fedlit method as a real Flower federation (the apps);
  :mod:`fedlit.integrations.flower_deploy` — app directory, deployment commands, `fedlit flower`
  (``pip install 'fedlit[flower]'``; ``fedlit flower --config …``).
"""
